"""Safe loading: pickles never run, broken files are named, nothing from the network, SD vs SDXL."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from helpers import BROKEN, one_line
from t2i import models
from t2i.errors import ModelLoadError, UnsafeFileError, UsageError
from t2i.files import check_safetensors


def test_the_payload_really_runs_code(evil, marker, tmp_path):
    """The control: plain unpickling creates the marker, so its absence below means something."""
    pickle.loads(evil("probe.pkl").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("name, zip_format", [("m.ckpt", True), ("m.bin", False), ("m.pt", True),
                                              ("m.pth", False), ("m.safetensors", False),
                                              ("zipped.safetensors", True)])
def test_pickle_model_file_is_refused(run_cli, evil, marker, tmp_path, name, zip_format):
    path = evil(name, zip_format)
    code, stdout, stderr = run_cli("generate", "a", "--model", path, "--out", tmp_path / "out")
    assert code == 2 and stdout == ""
    line = one_line(stderr)
    assert "pickle" in line
    if not name.endswith(".safetensors"):
        assert "--allow-pickle" in line
    assert not marker.exists()


@pytest.mark.parametrize("name", ["l.ckpt", "l.bin", "l.pt", "l.pth", "l.safetensors"])
def test_pickle_lora_file_is_refused(run_cli, evil, marker, tiny_sd, tmp_path, name, no_model_load):
    path = evil(name)
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--lora", f"{path}:0.5", "--out", tmp_path / "o")
    assert code == 2
    assert "pickle" in one_line(stderr)
    assert not marker.exists()


def test_folder_with_only_pickled_unet_weights_is_refused(run_cli, evil, marker, sd_copy, tmp_path):
    (sd_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    evil(str(sd_copy / "unet" / "diffusion_pytorch_model.bin"), zip_format=True)
    code, _, stderr = run_cli("generate", "a", "--model", sd_copy, "--out", tmp_path / "o")
    assert code == 2
    line = one_line(stderr)
    assert "pickle" in line and "--allow-pickle" in line
    assert not marker.exists()


def test_allow_pickle_still_never_runs_code(run_cli, evil, marker, tmp_path):
    path = evil("m.ckpt", zip_format=True)
    code, _, stderr = run_cli("generate", "a", "--model", path, "--allow-pickle", "--out", tmp_path / "o")
    assert code == 2
    assert "could not read" in one_line(stderr)  # torch.load(weights_only=True) refuses code objects
    assert not marker.exists()


# --------------------------------------------------------------------------- broken files


def _truncated(tiny_sd, tmp_path) -> Path:
    data = (tiny_sd / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", [*BROKEN, "truncated"])
def test_broken_safetensors_are_refused_in_one_line(run_cli, tiny_sd, tmp_path, kind):
    if kind == "truncated":
        path, words = _truncated(tiny_sd, tmp_path), "truncated"
    else:
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(BROKEN[kind][0])
        words = BROKEN[kind][1]
    code, _, stderr = run_cli("generate", "a", "--model", path, "--out", tmp_path / "o")
    assert code == 2
    line = one_line(stderr)
    assert words in line.lower() and path.name in line
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--lora", path, "--out", tmp_path / "o")
    assert code == 2 and words in one_line(stderr).lower()


@pytest.mark.parametrize("kind, words", [("png", "it is a PNG image"), ("jpeg", "it is a JPEG image"),
                                         ("html", "it is an HTML page"), ("text", "it is a text file (it begins 'Entry")])
def test_a_file_of_another_kind_named_safetensors_is_named_for_what_it_is(run_cli, tiny_sd, tmp_path, kind, words):
    path = tmp_path / f"{kind}.safetensors"
    if kind in ("png", "jpeg"):
        data = io.BytesIO()
        Image.new("RGB", (8, 8)).save(data, kind.upper())
        path.write_bytes(data.getvalue())
    else:
        path.write_bytes(BROKEN["html"][0] if kind == "html" else b"Entry not found")
    with pytest.raises(ModelLoadError, match="is not a valid safetensors file: " + re.escape(words)):
        check_safetensors(path)
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--lora", path, "--out", tmp_path / "o")
    assert code == 2 and words in one_line(stderr) and "download it again" not in stderr


def test_truncated_weights_inside_a_folder_are_refused(run_cli, tiny_sd, sd_copy, tmp_path):
    shutil.copy(_truncated(tiny_sd, tmp_path), sd_copy / "vae" / "diffusion_pytorch_model.safetensors")
    code, _, stderr = run_cli("generate", "a", "--model", sd_copy, "--out", tmp_path / "o")
    assert code == 2 and "truncated" in one_line(stderr)


def test_non_diffusers_library_in_model_index_is_refused(run_cli, sd_copy, tmp_path):
    index = sd_copy / "model_index.json"
    config = json.loads(index.read_text())
    config["unet"] = ["my_custom_models", "EvilUNet"]
    index.write_text(json.dumps(config))
    with pytest.raises(UnsafeFileError, match="my_custom_models"):
        models.check_folder(sd_copy)
    code, _, stderr = run_cli("generate", "a", "--model", sd_copy, "--out", tmp_path / "o")
    assert code == 2 and "custom code" in one_line(stderr)


def test_folder_with_python_code_is_refused(run_cli, sd_copy, marker, tmp_path):
    (sd_copy / "unet" / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    code, _, stderr = run_cli("generate", "a", "--model", sd_copy, "--out", tmp_path / "o")
    assert code == 2
    assert "pipeline.py" in one_line(stderr)
    assert not marker.exists()


def test_damaged_model_index_is_one_line(run_cli, sd_copy, tmp_path):
    (sd_copy / "model_index.json").write_text("{not json")
    code, _, stderr = run_cli("generate", "a", "--model", sd_copy, "--out", tmp_path / "o")
    assert code == 2 and "not valid JSON" in one_line(stderr)


def test_folder_without_model_index_is_refused(run_cli, tmp_path, no_model_load):
    code, _, stderr = run_cli("generate", "a", "--model", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "model_index.json" in one_line(stderr)


# --------------------------------------------------------------------------- resolving


def test_hub_id_offline_is_one_line(run_cli, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.resolve("some-org/some-model").kind == "hub"
    code, stdout, stderr = run_cli("generate", "a", "--model", "some-org/some-model", "--out", tmp_path / "o")
    assert code == 2 and stdout == ""
    line = one_line(stderr)
    assert "hub" in line and "offline" in line


def test_missing_local_path_does_not_exist(run_cli, tmp_path, no_model_load):
    for missing in (tmp_path / "nope", tmp_path / "nope.safetensors", "./nope/model"):
        code, _, stderr = run_cli("generate", "a", "--model", missing, "--out", tmp_path / "o")
        assert code == 2 and "does not exist" in one_line(stderr)
    with pytest.raises(UsageError, match="does not exist"):
        models.resolve(str(tmp_path / "a" / "b" / "c"))


def test_resolve_kinds(tiny_sd, tmp_path):
    assert models.resolve(str(tiny_sd)).kind == "folder"
    assert models.resolve(str(tiny_sd)).name == "tiny-sd"
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    assert models.resolve(str(file)).kind == "single_file"
    assert models.resolve("org/name").kind == "hub"


def test_arch_of_folder(tiny_sd, tiny_sdxl):
    assert models.arch_of_folder(tiny_sd) == "sd1"
    assert models.arch_of_folder(tiny_sdxl) == "sdxl"


def test_arch_of_folder_sd2(sd_copy):
    unet = sd_copy / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "cross_attention_dim": 1024}))
    assert models.arch_of_folder(sd_copy) == "sd2"


def test_arch_of_keys():
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    assert models.arch_of_keys([unet, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]) \
        == "sd1"
    assert models.arch_of_keys([unet, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]) == "sd2"
    assert models.arch_of_keys([unet, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                 "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    with pytest.raises(ModelLoadError):
        models.arch_of_keys(["encoder.layers.0.weight"])


def test_model_hash_follows_the_weights(tiny_sd, sd_copy):
    folder = models.ModelSource("folder", str(tiny_sd), "tiny-sd")
    copy = models.ModelSource("folder", str(sd_copy), "model")
    assert models.model_hash(folder) == models.model_hash(copy)
    weights = sd_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert models.model_hash(copy) != models.model_hash(folder)
