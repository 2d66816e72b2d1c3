"""LoRA file layouts: diffusers <-> kohya round trips, metadata, stock diffusers loading, strict matching.

Tier 1: random LoRAs on the tiny models of conftest.py, two sampling steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_line, pixels
from t2i.lora import format as lora_format
from t2i.errors import ModelLoadError, NumericalError, UsageError

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
META = {"t2i.base_model": "tiny-sd", "t2i.base_model_hash": "0123456789", "t2i.rank": "4", "t2i.alpha": "8",
        "t2i.steps": "300", "t2i.trigger": "in sks style", "t2i.resolution": "32"}


def make_lora(model: Path, seed: int, rank: int = 4, unet_targets: list[str] = UNET_TARGETS,
              conv_rank: int | None = None) -> dict[str, torch.Tensor]:
    """A random LoRA (UNet `unet_targets` + every text encoder's attention) in the trainer's layout:
    'unet.<module>.lora_A.weight'; the ResNet convolutions (LoCon) at `conv_rank` when given."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": (UNet2DConditionModel, UNET_TARGETS), "text_encoder": (CLIPTextModel, TEXT_TARGETS),
             "text_encoder_2": (CLIPTextModelWithProjection, TEXT_TARGETS)}
    sd = {}
    torch.manual_seed(seed)
    parts["unet"] = (UNet2DConditionModel, unet_targets)
    for name, (cls, targets) in parts.items():
        if not (model / name).is_dir():
            continue
        module = cls.from_pretrained(str(model / name))
        convs = {c: conv_rank for c in ("conv1", "conv2")} if conv_rank and name == "unet" else {}
        # init_lora_weights=False: random lora_B, so the LoRA changes the output
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False,
                                           rank_pattern=convs, alpha_pattern=convs), module)
        sd.update({f"{name}.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(module).items()})
    return sd


@pytest.fixture(scope="module")
def sd_lora(tiny_sd):
    return make_lora(tiny_sd, seed=0)


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl):
    return make_lora(tiny_sdxl, seed=0)


@pytest.fixture(scope="module")
def locon_lora(tiny_sd):
    """Every target of `--targets all`: attention, the transformer blocks' MLPs, the ResNet convolutions at rank 2."""
    from t2i.train.lora_config import TARGETS

    return {k: v * 0.5 for k, v in make_lora(tiny_sd, seed=2, unet_targets=TARGETS["all"], conv_rank=2).items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd_lora, tiny_sd) -> dict[str, Path]:
    """The SD LoRA in both layouts, and a second, different LoRA."""
    folder = tmp_path_factory.mktemp("loras")
    return {
        "diffusers": lora_format.save_lora(folder / "ink.safetensors", sd_lora, META),
        "kohya": lora_format.save_lora(folder / "ink-kohya.safetensors", sd_lora, META, format="kohya"),
        "other": lora_format.save_lora(folder / "film.safetensors", make_lora(tiny_sd, seed=1), {}),
    }


@pytest.fixture(scope="module")
def locon_files(tmp_path_factory, locon_lora) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("locon")
    return {layout: lora_format.save_lora(folder / f"locon-{layout}.safetensors", locon_lora, META, format=layout)
            for layout in lora_format.FORMATS}


def canonical(sd: dict) -> dict:
    """Files spell CLIP modules `text_model.encoder...`, as kohya and transformers 4 do (transformers 5's
    CLIPTextModel dropped the `text_model` level; diffusers loads both spellings)."""
    return {re.sub(r"^(text_encoder(?:_2)?)\.encoder\.", r"\1.text_model.encoder.", k): v for k, v in sd.items()}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_diffusers_kohya_diffusers_round_trip_is_bit_for_bit(which, sd_lora, sdxl_lora, tmp_path):
    sd = {"sd": sd_lora, "sdxl": sdxl_lora}[which]
    kohya = lora_format.to_kohya(sd)
    assert lora_format.detect_layout(kohya) == "kohya"
    prefixes = {k.split("_text_model")[0] for k in kohya if "_text_model_" in k}
    assert prefixes == ({"lora_te"} if which == "sd" else {"lora_te1", "lora_te2"})
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    alphas = {k: v for k, v in kohya.items() if k.endswith(".alpha")}
    assert len(alphas) == len(sd) // 2 and all(float(v) == 4 for v in alphas.values())  # scale baked: alpha = rank
    assert same_tensors(lora_format.to_diffusers(kohya), canonical(sd))

    # and through files, both ways
    path = lora_format.save_lora(tmp_path / "k.safetensors", sd, META, format="kohya")
    stored, _ = lora_format.read_lora(path)
    assert lora_format.detect_layout(stored) == "kohya"
    assert same_tensors(lora_format.to_diffusers(stored), canonical(sd))
    again = lora_format.save_lora(tmp_path / "d.safetensors", stored, {}, format="diffusers")
    assert same_tensors(lora_format.read_lora(again)[0], canonical(sd))


def test_kohya_names_of_every_module_read_back(sd_pipe, sdxl_pipe):
    """Every Linear/Conv2d of both UNets and all text encoders survives dots -> underscores -> dots."""
    from t2i.lora.apply import lora_components

    for pipe in (sd_pipe.pipe, sdxl_pipe.pipe):
        sd = {}
        for component, module in lora_components(pipe).items():
            for name, m in module.named_modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    sd[f"{component}.{name}.lora_A.weight"] = torch.zeros(1, 1)
                    sd[f"{component}.{name}.lora_B.weight"] = torch.zeros(1, 1)
        assert len(sd) > 100
        assert lora_format.to_diffusers(lora_format.to_kohya(sd)).keys() == canonical(sd).keys()


def test_kohya_alpha_is_folded_into_lora_up(sd_lora, tiny_sd, tmp_path):
    kohya = lora_format.to_kohya(sd_lora)
    kohya = {k: torch.tensor(8.0) if k.endswith(".alpha") else v for k, v in kohya.items()}  # alpha = 2 x rank
    folded = lora_format.to_diffusers(kohya)
    for k, v in canonical(sd_lora).items():
        assert torch.equal(folded[k], v * 2 if ".lora_B." in k else v)
    missing = {k: v for k, v in kohya.items() if not k.endswith(".alpha")}  # kohya: no alpha means alpha = rank
    assert same_tensors(lora_format.to_diffusers(missing), canonical(sd_lora))

    # diffusers' own reading of the alpha=8 kohya file agrees with the folded diffusers file
    from safetensors.torch import save_file

    save_file(kohya, str(tmp_path / "alpha8.safetensors"))
    folded_file = lora_format.save_lora(tmp_path / "folded.safetensors", kohya, {})
    a, b = stock_images(tiny_sd, tmp_path / "alpha8.safetensors", folded_file)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_diffusers_adapter_metadata_alpha_is_honoured(sd_lora):
    """A diffusers file whose header says lora_alpha=8 (rank 4) means lora_B x 2; kohya gets alpha 8."""
    import json

    meta = {lora_format.ADAPTER_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                         "text_encoder.r": 4, "text_encoder.lora_alpha": 4})}
    kohya = lora_format.to_kohya(sd_lora, meta)
    assert {float(v) for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith(".alpha")} == {8.0}
    assert {float(v) for k, v in kohya.items() if k.startswith("lora_te_") and k.endswith(".alpha")} == {4.0}
    baked = lora_format.to_diffusers(sd_lora, meta)
    for k, v in canonical(sd_lora).items():
        assert torch.equal(baked[k], v * 2 if k.startswith("unet.") and ".lora_B." in k else v)


def kohya_name_rule(module: str, xl: bool) -> str:
    """kohya's/A1111's LoRA module name, from their rules: a prefix per component, then the diffusers module path
    with dots as underscores (kohya's networks/lora.py: `lora_name = prefix + "." + name + "." + child_name`,
    then `.replace(".", "_")`)."""
    component, _, path = module.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if xl else "lora_te", "text_encoder_2": "lora_te2"}
    return f"{prefix[component]}_{path.replace('.', '_')}"


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_kohya_names_follow_kohyas_rules(which, tiny_sd, tiny_sdxl):
    from t2i.train.lora_config import TARGETS

    lora = canonical(make_lora({"sd": tiny_sd, "sdxl": tiny_sdxl}[which], seed=0, unet_targets=TARGETS["all"],
                               conv_rank=2))
    kohya = lora_format.to_kohya(lora)
    modules = {k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    expected = {kohya_name_rule(m, which == "sdxl") for m in modules}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya} == expected
    for m in modules:  # lora_down/lora_up as kohya stores them: the convolutions as (rank, in, kh, kw) / (out, rank, 1, 1)
        name = kohya_name_rule(m, which == "sdxl")
        assert torch.equal(kohya[f"{name}.lora_down.weight"], lora[f"{m}.lora_A.weight"])
        assert torch.equal(kohya[f"{name}.lora_up.weight"], lora[f"{m}.lora_B.weight"])
    # names as A1111/ComfyUI look them up (what their key maps are built from)
    block = "down_blocks_0" if which == "sd" else "down_blocks_1"  # the tiny SDXL's first block has no attention
    for name in (f"lora_unet_{block}_resnets_0_conv1", f"lora_unet_{block}_resnets_0_conv2",
                 f"lora_unet_{block}_attentions_0_proj_in", f"lora_unet_{block}_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 f"lora_unet_{block}_attentions_0_transformer_blocks_0_ff_net_2",
                 f"lora_unet_{block}_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj" if which == "sd"
                 else "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"):
        assert f"{name}.lora_down.weight" in kohya and f"{name}.alpha" in kohya, name
    conv = kohya[f"lora_unet_{block}_resnets_0_conv1.lora_down.weight"]
    assert conv.dim() == 4 and conv.shape[0] == 2 and conv.shape[2:] == (3, 3)
    assert same_tensors(lora_format.to_diffusers(kohya), lora)


def test_locon_loads_alike_in_stock_diffusers_and_t2i(locon_files, locon_lora, tiny_sd, sd_pipe):
    """LoRA on the MLPs and ResNet convolutions: stock `load_lora_weights` gives the same image from either layout,
    so does t2i, and t2i's reading of each file gives back the tensors written."""
    for layout, path in locon_files.items():
        stored, meta = lora_format.read_lora(path)
        assert same_tensors(lora_format.to_diffusers(stored), canonical(locon_lora)), layout
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2"}'  # kohya's conv_dim, as kohya records it
    plain, stock_d, stock_k = stock_images(tiny_sd, None, locon_files["diffusers"], locon_files["kohya"])
    assert np.abs(plain - stock_d).max() > 0.01
    assert np.array_equal(stock_d, stock_k)
    try:
        t2i_d, t2i_k = (pixels(sd_pipe("a red circle", steps=2, seed=0, loras=[str(locon_files[layout])],
                                       progress=False).images[0]) for layout in ("diffusers", "kohya"))
    finally:
        sd_pipe("a red circle", steps=1, seed=0, progress=False)  # leave the shared pipeline without adapters
    assert np.array_equal(t2i_d, t2i_k)


def test_lycoris_locon_cp_form_is_folded_exactly(locon_lora, sd_pipe, tmp_path):
    """LyCORIS' LoCon with CP/Tucker: lora_down 1x1, lora_mid (rank, rank, 3, 3), lora_up; read as a plain LoRA."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    kohya = lora_format.to_kohya(locon_lora)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    torch.manual_seed(0)
    c_in = kohya[f"{name}.lora_down.weight"].shape[1]
    down, mid = torch.randn(2, c_in, 1, 1), torch.randn(2, 2, 3, 3)
    cp = {**kohya, f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid}
    folded = lora_format.to_diffusers(cp)["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    x = torch.randn(1, c_in, 8, 8)
    torch.testing.assert_close(F.conv2d(x, folded, padding=1), F.conv2d(F.conv2d(x, down), mid, padding=1))
    save_file(cp, str(tmp_path / "cp.safetensors"))
    try:
        before = pixels(sd_pipe("a red circle", steps=2, seed=0, progress=False).images[0])
        with_cp = pixels(sd_pipe("a red circle", steps=2, seed=0, loras=[str(tmp_path / "cp.safetensors")],
                                 progress=False).images[0])
    finally:
        sd_pipe("a red circle", steps=1, seed=0, progress=False)
    assert not np.array_equal(before, with_cp)


def test_unknown_layout_is_an_error_naming_the_keys():
    with pytest.raises(ModelLoadError, match=r"unknown LoRA layout.*'model\.diffusion_model\.foo\.weight'"):
        lora_format.detect_layout({"model.diffusion_model.foo.weight": torch.zeros(1)})
    with pytest.raises(ModelLoadError, match="hada_w1_a"):  # LyCORIS LoHa: not a plain LoRA
        lora_format.detect_layout({"lora_unet_a_b.hada_w1_a": torch.zeros(1)})


# --------------------------------------------------------------------------- files and metadata


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_metadata_survives_save_and_read(files, layout):
    sd, meta = lora_format.read_lora(files[layout])
    assert lora_format.detect_layout(sd) == layout
    assert {k: meta[k] for k in META} == META
    assert meta["format"] == "pt"
    if layout == "kohya":
        assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"], meta["ss_new_sd_model_hash"],
                meta["ss_sd_model_name"]) == ("4", "4", "300", "0123456789", "tiny-sd")
        assert meta["t2i.training_alpha"] == "8"  # ss_network_alpha is the folded one; the trained one is kept
    else:
        assert not any(k.startswith("ss_") for k in meta)


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(sd_lora, tmp_path):
    path = lora_format.save_lora(tmp_path / "a.safetensors", sd_lora, {"t2i.steps": "1"})
    with pytest.raises(UsageError, match="exists"):
        lora_format.save_lora(path, sd_lora, {"t2i.steps": "2"})
    assert lora_format.read_lora(path)[1]["t2i.steps"] == "1"
    lora_format.save_lora(path, sd_lora, {"t2i.steps": "2"}, format="kohya", overwrite=True)
    assert lora_format.read_lora(path)[1]["t2i.steps"] == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(UsageError, match="format"):
        lora_format.save_lora(tmp_path / "b.safetensors", sd_lora, {}, format="a1111")


def test_saved_lora_gets_the_users_usual_file_mode(sd_lora, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:  # safetensors >= 0.8 writes 0600 (through a temp file): a web UI run as another user could not read it
        path = lora_format.save_lora(tmp_path / "a.safetensors", sd_lora, {})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        lora_format.save_lora(path, sd_lora, {}, format="kohya", overwrite=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(mask)


def test_nan_weights_are_refused_on_save_and_load(sd_lora, tmp_path):
    from safetensors.torch import save_file

    key = next(iter(sd_lora))
    bad = {**sd_lora, key: sd_lora[key] * float("nan")}
    with pytest.raises(NumericalError, match="NaN"):
        lora_format.save_lora(tmp_path / "nan.safetensors", bad, {})
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelLoadError, match="NaN/inf"):
        lora_format.read_lora(tmp_path / "nan.safetensors")


# --------------------------------------------------------------------------- loading


def stock_images(model: Path, *loras: Path | None) -> list[np.ndarray]:
    """Images from plain diffusers (no t2i code) with each LoRA loaded by `pipe.load_lora_weights(path)`."""
    from diffusers import StableDiffusionPipeline

    out = []
    for lora in loras:
        pipe = StableDiffusionPipeline.from_pretrained(str(model))
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        out.append(pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        output_type="np").images[0])
    return out


def test_stock_diffusers_loads_both_layouts(files, tiny_sd):
    plain, diffusers_layout, kohya_layout = stock_images(tiny_sd, None, files["diffusers"], files["kohya"])
    assert np.abs(plain - diffusers_layout).max() > 0.01
    assert np.array_equal(diffusers_layout, kohya_layout)


def test_kohya_export_gives_the_same_image_through_t2i_generate(run_cli, files, tiny_sd, tmp_path):
    def make(name, *lora):
        out = tmp_path / name
        code, _, err = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 3, "--out",
                               out, "-q", *lora)
        assert code == 0, err
        return pixels(Image.open(out))

    plain = make("plain.png")
    diffusers_layout = make("d.png", "--lora", f"{files['diffusers']}:0.8")
    kohya_layout = make("k.png", "--lora", f"{files['kohya']}:0.8")
    assert not np.array_equal(plain, diffusers_layout)
    assert np.array_equal(diffusers_layout, kohya_layout)


def test_two_loras_at_once_with_their_own_scales(sd_pipe, files):
    def image(*loras):
        return pixels(sd_pipe("a red circle", steps=2, seed=3, loras=list(loras), progress=False).images[0])

    try:
        ink, film = image(f"{files['diffusers']}:0.8"), image(f"{files['other']}:0.5")
        both = image(f"{files['diffusers']}:0.8", f"{files['other']}:0.5")
        mixed_layouts = image(f"{files['kohya']}:0.8", f"{files['other']}:0.5")
        other_scales = image(f"{files['diffusers']}:0.3", f"{files['other']}:1.0")
    finally:
        image()  # leave the shared pipeline without adapters
    assert not np.array_equal(both, ink) and not np.array_equal(both, film)
    assert not np.array_equal(both, other_scales)
    assert np.array_equal(both, mixed_layouts)


def test_sdxl_lora_on_sd_model_is_refused_with_a_count(run_cli, tiny_sd, sdxl_lora, tmp_path):
    path = lora_format.save_lora(tmp_path / "xl.safetensors", sdxl_lora, {})
    code, _, err = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--lora", path,
                           "--out", tmp_path / "x.png", "-q")
    line = one_line(err)
    assert code == 2
    m = re.search(r"LoRA xl\.safetensors matched (\d+) of (\d+) modules", line)
    assert m and int(m.group(1)) < int(m.group(2)) == len(sdxl_lora) // 2, line
    assert "SDXL LoRA on an SD 1.x/2.x model?" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_renamed_keys_are_refused_and_nothing_stays_loaded(sd_pipe, sd_lora, layout, tmp_path):
    renamed = {k.replace("attn2.to_k", "attn2.to_key"): v for k, v in sd_lora.items()}
    path = lora_format.save_lora(tmp_path / "renamed.safetensors", renamed, {}, format=layout)
    before = pixels(sd_pipe("a red circle", steps=2, seed=3, progress=False).images[0])
    with pytest.raises(ModelLoadError, match=r"matched 36 of 40 modules .*attn2\.to[._]key: no such module.*refused"):
        sd_pipe("a red circle", steps=2, seed=3, loras=[str(path)], progress=False)
    assert not any(sd_pipe.pipe.get_list_adapters().values())
    after = pixels(sd_pipe("a red circle", steps=2, seed=3, progress=False).images[0])
    assert np.array_equal(before, after)


def test_a_load_that_fails_halfway_leaves_no_adapter(sd_pipe, files, monkeypatch):
    real = sd_pipe.pipe.load_lora_weights

    def load_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("simulated failure after the adapters went in")

    monkeypatch.setattr(sd_pipe.pipe, "load_lora_weights", load_then_fail)
    with pytest.raises(ModelLoadError, match="simulated failure"):
        sd_pipe("a red circle", steps=2, seed=3, loras=[str(files["diffusers"])], progress=False)
    assert not any(sd_pipe.pipe.get_list_adapters().values())


def test_kohya_sdxl_file_with_sgm_names_loads_like_the_diffusers_one(sdxl_pipe, sdxl_lora, tmp_path):
    """kohya's own SDXL files name UNet blocks the sgm way: input_blocks_3_1_... for down_blocks.1.attentions.0."""
    from safetensors.torch import save_file

    per_block = sdxl_pipe.pipe.unet.config.layers_per_block + 1

    def sgm(key: str) -> str:
        m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_attentions_(\d+)_(.*)", key)
        if m is None:
            return key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")
        where, block, layer, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if where == "down":
            return f"lora_unet_input_blocks_{1 + block * per_block + layer}_1_{rest}"
        return f"lora_unet_output_blocks_{block * per_block + layer}_1_{rest}"

    kohya = {sgm(k): v for k, v in lora_format.to_kohya(sdxl_lora).items()}
    assert any("input_blocks" in k for k in kohya) and any("output_blocks" in k for k in kohya)
    save_file(kohya, str(tmp_path / "sgm.safetensors"))
    diffusers_file = lora_format.save_lora(tmp_path / "xl.safetensors", sdxl_lora, {})

    def image(*loras):
        return pixels(sdxl_pipe("a red circle", steps=2, seed=3, loras=list(loras), progress=False).images[0])

    try:
        plain, sgm_named = image(), image(str(tmp_path / "sgm.safetensors"))
        diffusers_layout = image(str(diffusers_file))
    finally:
        image()
    assert not np.array_equal(plain, sgm_named)
    assert np.array_equal(sgm_named, diffusers_layout)


# --------------------------------------------------------------------------- t2i lora convert / info


def test_lora_convert(run_cli, files, sd_lora, tmp_path):
    out = tmp_path / "ink-kohya.safetensors"
    code, stdout, err = run_cli("lora", "convert", files["diffusers"], out, "--format", "kohya")
    assert code == 0, err
    assert stdout.strip() == str(out)
    stored, meta = lora_format.read_lora(out)
    assert same_tensors(stored, lora_format.to_kohya(sd_lora))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in stored  # kohya's spelling
    assert meta["t2i.trigger"] == "in sks style" and meta["ss_network_dim"] == "4"

    code, _, err = run_cli("lora", "convert", files["diffusers"], out, "--format", "kohya")
    assert code == 2 and "exists" in one_line(err) and "--overwrite" in err
    back = tmp_path / "back.safetensors"
    assert run_cli("lora", "convert", out, back, "--format", "diffusers")[0] == 0
    assert same_tensors(lora_format.read_lora(back)[0], canonical(sd_lora))
    assert run_cli("lora", "convert", back, out, "--format", "kohya", "--overwrite")[0] == 0

    code, _, err = run_cli("lora", "convert", files["diffusers"], tmp_path / "x.safetensors")
    assert code == 2 and "--format" in one_line(err)


def test_lora_info_prints_format_rank_alpha_modules_and_metadata(run_cli, files):
    code, stdout, err = run_cli("lora", "info", files["kohya"])
    assert code == 0, err
    assert "format: kohya" in stdout and "rank: 4" in stdout and "alpha: 4" in stdout
    assert "modules: 40 (unet 32, text_encoder 8)" in stdout
    assert re.search(r"t2i\.trigger\s+in sks style", stdout) and re.search(r"t2i\.base_model_hash\s+0123456789", stdout)
    code, stdout, _ = run_cli("lora", "info", files["diffusers"])
    assert code == 0 and "format: diffusers" in stdout and re.search(r"t2i\.steps\s+300", stdout)


def test_lora_commands_refuse_pickles_and_missing_files(run_cli, tmp_path):
    torch.save({"lora_unet_a.lora_down.weight": torch.zeros(1, 1)}, tmp_path / "x.pt")
    code, _, err = run_cli("lora", "info", tmp_path / "x.pt")
    assert code == 2 and "pickle" in one_line(err)
    code, _, err = run_cli("lora", "info", tmp_path / "missing.safetensors")
    assert code == 2 and "missing.safetensors" in one_line(err)
