"""Single-file checkpoints (A1111/CompVis layout), offline, from locally built tiny models.

`ldm_format` writes a tiny diffusers folder as one original-layout file; loading
it back must give the very same weights and the very same image as the folder.
That proves the conversion exact, and so proves t2i's single-file path end to end.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_models
from helpers import one_line, pixels
from ldm_format import save_ldm_checkpoint, to_ldm_state_dict
from t2i import models
from t2i import metadata
from t2i.errors import UnsafeFileError
from t2i.pipelines import Text2Image

PIPE_KWARGS = {"sd1": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
               "sdxl": {}}


def _sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, tokenizer_dir) -> Path:
    """Tiny SDXL whose second encoder is wider than the first, as in the real model (see build_sdxl)."""
    return tiny_models.build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl-wide", tokenizer_dir, hidden_2=48)


@pytest.fixture(scope="module")
def folders(tiny_sd, sdxl_folder) -> dict[str, Path]:
    return {"sd1": tiny_sd, "sdxl": sdxl_folder}


@pytest.fixture(scope="module")
def checkpoints(folders, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_ldm_checkpoint(folder, out / f"tiny-{arch}.safetensors") for arch, folder in folders.items()}


def _latents(pipe) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(1)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=generator,
                output_type="latent").images  # (1, 4, 16, 16)


# --------------------------------------------------------------------------- the file itself


def test_checkpoint_has_the_original_layout(tiny_sd):
    state = to_ldm_state_dict(tiny_sd)
    assert models.arch_of_keys(state) == "sd1"
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    # Names that only the positional LDM numbering produces: a downsampler block, an upsampler after attention.
    for key in ("model.diffusion_model.input_blocks.2.0.op.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight",
                "model.diffusion_model.middle_block.2.in_layers.2.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, not linear
    folder_tensors = sum(len(load_file(str(p))) for p in tiny_sd.glob("*/*.safetensors"))
    assert len(state) == folder_tensors  # nothing dropped, nothing invented


def test_sdxl_checkpoint_has_the_original_layout(sdxl_folder):
    state = to_ldm_state_dict(sdxl_folder)
    assert models.arch_of_keys(state) == "sdxl"
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert "model.diffusion_model.label_emb.0.0.weight" in state


# --------------------------------------------------------------------------- diffusers: same weights, same image


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_from_single_file_equals_from_pretrained(folders, checkpoints, arch):
    cls = models.loading._pipeline_class(arch)
    folder = cls.from_pretrained(str(folders[arch]), local_files_only=True, **PIPE_KWARGS[arch])
    single = cls.from_single_file(str(checkpoints[arch]), config=str(folders[arch]), local_files_only=True,
                                  **PIPE_KWARGS[arch])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name not in folder.components:
            continue
        want, got = folder.components[name].state_dict(), single.components[name].state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert torch.equal(_latents(folder), _latents(single))


# --------------------------------------------------------------------------- t2i


def test_text2image_single_file_matches_the_folder(sd_pipe, checkpoints, tiny_sd):
    path = checkpoints["sd1"]
    pipe = Text2Image.from_pretrained(str(path), model_config=str(tiny_sd), device="cpu", dtype="fp32")
    assert (pipe.model.source.kind, pipe.model.arch, pipe.model.hash) == ("single_file", "sd1", _sha10(path))
    want = sd_pipe("a red circle", steps=2, seed=1, progress=False)
    got = pipe("a red circle", steps=2, seed=1, progress=False)
    assert (pixels(got.images[0]) == pixels(want.images[0])).all()
    s = got.settings[0]
    assert (s.model_hash, s.model_name, s.arch) == (_sha10(path), "tiny-sd1", "sd1")


def test_text2image_sdxl_single_file_matches_the_folder(checkpoints, sdxl_folder):
    folder = Text2Image.from_pretrained(str(sdxl_folder), device="cpu", dtype="fp32")
    single = Text2Image.from_pretrained(str(checkpoints["sdxl"]), model_config=str(sdxl_folder), device="cpu",
                                        dtype="fp32")
    assert single.model.arch == "sdxl"
    want, got = (p("a red circle", steps=2, seed=1, progress=False).images[0] for p in (folder, single))
    assert (pixels(got) == pixels(want)).all()


def test_cli_generates_from_a_checkpoint(run_cli, checkpoints, tiny_sd, tmp_path):
    path = checkpoints["sd1"]
    args = ("generate", "a red circle", "--steps", 2, "--seed", 1, "-q")
    code, stdout, stderr = run_cli(*args, "--model", path, "--model-config", tiny_sd, "--out", tmp_path / "file.png")
    assert code == 0, stderr
    assert stdout.splitlines() == [str(tmp_path / "file.png")]
    code, _, stderr = run_cli(*args, "--model", tiny_sd, "--out", tmp_path / "folder.png")
    assert code == 0, stderr
    assert (pixels(Image.open(tmp_path / "file.png")) == pixels(Image.open(tmp_path / "folder.png"))).all()
    text, s = metadata.read(tmp_path / "file.png")
    assert f"Model hash: {_sha10(path)}" in text and "Model: tiny-sd1" in text
    assert (s.model_hash, s.arch, s.model) == (_sha10(path), "sd1", str(path))


# --------------------------------------------------------------------------- offline and pickles


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: offline mode and an empty cache, so nothing can be fetched or fallen back on."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_offline_without_model_config_asks_for_it(run_cli, offline, checkpoints, tmp_path):
    code, stdout, stderr = run_cli("generate", "a", "--model", checkpoints["sd1"], "--out", tmp_path / "o")
    assert code == 2 and stdout == ""
    line = one_line(stderr)
    assert "--model-config" in line and "tiny-sd1.safetensors" in line


def test_ckpt_needs_allow_pickle(run_cli, tiny_sd, checkpoints, tmp_path):
    ckpt = save_ldm_checkpoint(tiny_sd, tmp_path / "tiny-sd1.ckpt")
    code, _, stderr = run_cli("generate", "a red circle", "--model", ckpt, "--model-config", tiny_sd, "--out",
                              tmp_path / "refused")
    assert code == 2 and "--allow-pickle" in one_line(stderr)
    with pytest.raises(UnsafeFileError):
        Text2Image.from_pretrained(str(ckpt), model_config=str(tiny_sd), device="cpu", dtype="fp32")
    args = ("generate", "a red circle", "--steps", 2, "--seed", 1, "--model-config", tiny_sd, "-q")
    code, _, stderr = run_cli(*args, "--model", ckpt, "--allow-pickle", "--out", tmp_path / "ckpt.png")
    assert code == 0, stderr
    code, _, stderr = run_cli(*args, "--model", checkpoints["sd1"], "--out", tmp_path / "safetensors.png")
    assert code == 0, stderr
    assert (pixels(Image.open(tmp_path / "ckpt.png")) == pixels(Image.open(tmp_path / "safetensors.png"))).all()
    _, s = metadata.read(tmp_path / "ckpt.png")
    assert (s.model_hash, s.arch) == (_sha10(ckpt), "sd1")


@pytest.mark.parametrize("config, words", [("missing", "not a diffusers folder"),
                                           ("hub-like", "not a diffusers folder"),  # would otherwise go to the hub
                                           ("tokenizer", "not a diffusers folder"), ("sdxl", "is a sdxl model")])
def test_model_config_must_be_a_local_folder_of_the_same_arch(run_cli, offline, checkpoints, sdxl_folder,
                                                              tokenizer_dir, tmp_path, config, words):
    given = {"missing": tmp_path / "nope", "hub-like": "nope", "tokenizer": tokenizer_dir, "sdxl": sdxl_folder}[config]
    code, _, stderr = run_cli("generate", "a", "--model", checkpoints["sd1"], "--model-config", given, "--out",
                              tmp_path / "o")
    assert code == 2
    line = one_line(stderr)
    assert "--model-config" in line and words in line


def test_reproduce_a_checkpoint_image_uses_the_recorded_model_config(run_cli, offline, checkpoints, tiny_sd, tmp_path):
    out = tmp_path / "ckpt.png"
    code, _, stderr = run_cli("generate", "a red circle", "--steps", 2, "--seed", 4, "-q", "--model",
                              checkpoints["sd1"], "--model-config", tiny_sd, "--out", out)
    assert code == 0, stderr
    assert metadata.read(out)[1].model_config == str(tiny_sd)
    code, stdout, stderr = run_cli("reproduce", out, "-q")  # no --model-config: the recorded one is used
    assert code == 0, stderr
    assert "bit for bit" in stdout
