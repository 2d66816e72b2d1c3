"""`t2i guide`: a model's autoguidance guide as a few bits per weight of an earlier checkpoint's difference."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2i.models import guide as guides
from t2i.errors import ModelLoadError

UNET = Path("unet") / guides.UNET_FILE


def checkpoint(model: Path, folder: Path, size: float = 0.05, seed: int = 0) -> Path:
    """A `t2i train demo`-style checkpoint folder: the model's UNet plus a random change of every weight."""
    g = torch.Generator().manual_seed(seed)
    base = load_file(str(model / UNET))
    folder.mkdir(parents=True)
    save_file({k: (v.float() + size * torch.randn(v.shape, generator=g)).contiguous() for k, v in base.items()},
              str(folder / "ema_unet.safetensors"))
    return folder


def loaded_guide(model: Path):
    from t2i.pipelines import Text2Image

    return Text2Image.from_pretrained(str(model), device="cpu", dtype="fp32")


# ---------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_every_width(bits):
    for count in (1001, 1, 7, 8, 9, 64):  # 1001 is not a multiple of 8 codes; unpack reads 8 codes at a time
        codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8)
        packed = guides.pack(codes, bits)
        assert packed.dtype == torch.uint8 and len(packed) == -(-count * bits // 8)
        assert torch.equal(guides.unpack(packed, bits, count), codes)
    every = torch.arange(2**bits, dtype=torch.uint8).repeat(3)  # every code, at every place in a group
    assert torch.equal(guides.unpack(guides.pack(every, bits), bits, len(every)), every)


def test_more_bits_keep_more_of_the_difference():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 48, generator=g), "b": torch.randn(64, generator=g)}
    new = {"w": base["w"] + 0.01 * torch.randn(64, 48, generator=g), "b": base["b"] + 0.01}
    kept = [guides.encode(base, new, bits)[2] for bits in (1, 2, 3, 4, 8)]
    assert kept == sorted(kept) and kept[0] > 0.6 and kept[-1] > 0.9999
    tensors, meta, _ = guides.encode(base, new, 3)
    back = guides.decode(base, tensors, 3)
    assert torch.allclose(back["b"], new["b"], atol=1e-5)  # vectors are kept (fp16 differences)
    err = (back["w"] - new["w"]).abs()
    assert float(err.max()) < float((new["w"] - base["w"]).abs().max())  # never worse than the row's largest
    assert meta["format"] == guides.FORMAT and meta["bits"] == "3"


def test_one_bit_is_sign_and_scale():
    d = torch.randn(8, 100)
    codes, step = guides.quantize(d, 1)
    q = guides.dequantize(codes, step, 1)
    assert torch.equal(q.sign(), d.sign())
    scale = q.abs().amax(dim=1)
    assert torch.allclose(scale, d.abs().mean(dim=1), rtol=0.05)  # BitDelta's MSE-optimal scale


def test_the_fingerprint_is_by_value():
    a = {"x": torch.randn(3, 4).half(), "y": torch.zeros(2).half()}
    assert guides.fingerprint(a) == guides.fingerprint({k: v.float() for k, v in a.items()})
    assert guides.fingerprint(a) != guides.fingerprint(a | {"y": torch.ones(2).half()})


# ---------------------------------------------------------------------------- the command


def test_guide_writes_a_delta_that_the_pipeline_rebuilds(run_cli, sd_copy, tmp_path):
    ckpt = checkpoint(sd_copy, tmp_path / "step-00000100")
    code, stdout, stderr = run_cli("guide", "--model", sd_copy, "--from", ckpt, "--bits", 4, "--scale", 2.5,
                                   "--below", 400)
    assert code == 0, stderr
    folder = Path(stdout.strip())
    assert folder == sd_copy / "guide" and sorted(p.name for p in folder.iterdir()) == [
        "config.json", guides.DELTA_FILE]
    assert stat.S_IMODE(os.stat(folder / guides.DELTA_FILE).st_mode) == 0o644
    assert "4 bits per weight" in stderr and "autoguidance 2.5" in stderr
    defaults = json.loads((sd_copy / "t2i.json").read_text())
    assert (defaults["autoguidance"], defaults["autoguidance_below"]) == (2.5, 400)
    assert not (sd_copy / ".guide.tmp").exists()
    # far smaller than the UNet, and the rebuilt weights sit near the checkpoint's, far from the UNet's
    assert (folder / guides.DELTA_FILE).stat().st_size < 0.45 * (sd_copy / UNET).stat().st_size
    pipe = loaded_guide(sd_copy)
    assert (pipe.autoguidance, pipe.autoguidance_below) == (2.5, 400)
    want, base = load_file(str(ckpt / "ema_unet.safetensors")), load_file(str(sd_copy / UNET))
    got = pipe.guide.state_dict()
    near = sum(float((got[k] - want[k]).square().sum()) for k in want)
    far = sum(float((base[k].float() - want[k]).square().sum()) for k in want)
    assert near < 0.02 * far
    result = pipe("a red circle", seed=1, progress=False)
    assert result.settings[0].autoguidance == 2.5


def test_sixteen_bits_store_the_whole_unet(run_cli, sd_copy, tmp_path):
    ckpt = checkpoint(sd_copy, tmp_path / "ckpt")
    code, stdout, stderr = run_cli("guide", "--model", sd_copy, "--from", ckpt / "ema_unet.safetensors",
                                   "--bits", 16)
    assert code == 0 and "whole UNet" in stderr, stderr
    assert (sd_copy / "guide" / guides.UNET_FILE).is_file()
    got = loaded_guide(sd_copy).guide.state_dict()
    want = load_file(str(ckpt / "ema_unet.safetensors"))
    assert all(torch.equal(got[k], want[k].half().float()) for k in want)


def test_overwrite_replaces_the_guide_and_leaves_nothing_beside_it(run_cli, sd_copy, tmp_path):
    from safetensors import safe_open

    ckpt = checkpoint(sd_copy, tmp_path / "step-00000100")
    assert run_cli("guide", "--model", sd_copy, "--from", ckpt, "--bits", 4)[0] == 0
    assert run_cli("guide", "--model", sd_copy, "--from", ckpt / "ema_unet.safetensors", "--bits", 2,
                   "--overwrite")[0] == 0
    with safe_open(str(sd_copy / "guide" / guides.DELTA_FILE), framework="pt") as f:
        meta = f.metadata()
    assert meta["bits"] == "2" and meta["source"] == "step-00000100/ema_unet.safetensors"
    assert not [p for p in sd_copy.iterdir() if p.name.startswith(".")]


def test_a_unet_saved_again_in_fp32_keeps_its_guide(run_cli, sd_copy, tmp_path):
    assert run_cli("guide", "--model", sd_copy, "--from", checkpoint(sd_copy, tmp_path / "c"))[0] == 0
    base = load_file(str(sd_copy / UNET))
    save_file({k: v.float() for k, v in base.items()}, str(sd_copy / UNET))
    assert loaded_guide(sd_copy).guide is not None


def test_a_guide_for_another_unet_is_refused_at_load(run_cli, sd_copy, tmp_path):
    assert run_cli("guide", "--model", sd_copy, "--from", checkpoint(sd_copy, tmp_path / "c"))[0] == 0
    base = load_file(str(sd_copy / UNET))
    first = sorted(base)[0]
    save_file(base | {first: base[first] + 1}, str(sd_copy / UNET))  # the UNet was trained further
    with pytest.raises(ModelLoadError, match="another unet/.*t2i guide"):
        loaded_guide(sd_copy)
    code, stdout, stderr = run_cli("generate", "a", "--model", sd_copy, "--out", tmp_path / "o.png")
    assert code == 2 and "t2i guide" in stderr and "Traceback" not in stderr and not (tmp_path / "o.png").exists()


def test_stock_diffusers_loads_a_model_with_a_delta_guide(run_cli, sd_copy, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert run_cli("guide", "--model", sd_copy, "--from", checkpoint(sd_copy, tmp_path / "c"))[0] == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_copy), safety_checker=None, requires_safety_checker=False)
    assert pipe(prompt="a", num_inference_steps=2, output_type="np").images.shape[0] == 1


# ---------------------------------------------------------------------------- refusals


def test_refusals_are_one_line_and_leave_the_folder_as_it_was(run_cli, sd_copy, tmp_path):
    ckpt = checkpoint(sd_copy, tmp_path / "c")
    assert run_cli("guide", "--model", sd_copy, "--from", ckpt, "--scale", 2)[0] == 0
    before = {p: p.read_bytes() for p in sorted((sd_copy / "guide").iterdir())} | {
        sd_copy / "t2i.json": (sd_copy / "t2i.json").read_bytes()}
    other = tmp_path / "other"
    other.mkdir()
    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(other / "ema_unet.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    cases = [
        ((), "--overwrite"),  # a guide is there
        (("--overwrite", "--bits", 9), "--bits 9"),
        (("--overwrite", "--below", 0), "--below 0"),
        (("--overwrite", "--scale", -1), "autoguidance"),
        (("--overwrite", "--from", other), "architecture"),
        (("--overwrite", "--from", tmp_path / "model.ckpt"), "safetensors"),
        (("--overwrite", "--from", tmp_path / "missing"), "does not exist"),
    ]
    for extra, words in cases:
        argv = ["guide", "--model", sd_copy, "--from", ckpt, *extra]
        if "--from" in extra:
            argv = ["guide", "--model", sd_copy, *extra]
        code, stdout, stderr = run_cli(*argv)
        assert code == 2 and stdout == "" and words in stderr, (extra, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert before == {p: p.read_bytes() for p in before}
    assert not [p for p in sd_copy.iterdir() if p.name.startswith(".")]  # no half-written guide left behind
    code, _, stderr = run_cli("guide", "--model", tmp_path, "--from", ckpt)
    assert code == 2 and "model_index.json" in stderr
