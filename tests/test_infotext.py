"""Other tools' images: A1111's parameters in PNG text and JPEG/WebP EXIF, ComfyUI's graphs; hostile ones."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from t2i import infotext
from t2i.errors import UsageError

A1111_TEXT = ("a castle on a hill, <lora:ink:0.6>\nNegative prompt: blurry, lowres\n"
              "Steps: 12, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 5.5, Seed: 77, Size: 64x96, "
              "Model hash: 0123456789, Model: sd15, Clip skip: 2, Hires upscale: 2, Hires steps: 10, "
              "Hires upscaler: Latent, Denoising strength: 0.7, Version: v1.10.1")


def user_comment(text: str, byte_order: str = "be", prefix: bytes = b"UNICODE\0") -> Image.Exif:
    """An EXIF block as A1111 writes one (piexif.helper.UserComment.dump(text, encoding="unicode"))."""
    exif = Image.Exif()
    exif.get_ifd(infotext.EXIF_IFD)[infotext.USER_COMMENT] = prefix + text.encode(f"utf-16-{byte_order}")
    return exif


def comfy_graph(**ksampler) -> dict:
    """A ComfyUI API graph (the `prompt` chunk) as its default text-to-image workflow saves it."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15/v1-5-pruned.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "ink.safetensors", "strength_model": 0.8,
                                                      "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle, masterpiece", "clip": ["10", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["10", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 156680208700286, "steps": 20, "cfg": 8.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "denoise": 1.0, "model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0], **ksampler}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def png_with(path, **chunks):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (16, 16), "red").save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("byte_order", ["be", "le"])
def test_a1111_parameters_in_jpeg_and_webp_exif(tmp_path, fmt, byte_order):
    path = tmp_path / f"a.{fmt.lower()}"
    Image.new("RGB", (16, 16), "blue").save(path, format=fmt, exif=user_comment(A1111_TEXT, byte_order))
    found = infotext.read(path)
    assert found.source == "a1111" and found.text == A1111_TEXT
    p = found.params
    assert (p.prompt, p.negative_prompt) == ("a castle on a hill, <lora:ink:0.6>", "blurry, lowres")
    assert (p.steps, p.sampler, p.schedule, p.guidance, p.seed, p.width, p.height) == (
        12, "DPM++ 2M", "Exponential", 5.5, 77, 64, 96)
    assert (p.model_name, p.model_hash) == ("sd15", "0123456789")
    assert p.clip_skip == 2 and p.unhonoured == []
    assert p.hires == {"scale": 2.0, "width": 0, "height": 0, "steps": 10, "denoise": 0.7, "upscaler": "latent"}


def test_info_prints_a1111_exif_text(run_cli, tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=user_comment(A1111_TEXT))
    code, out, err = run_cli("info", path)
    assert code == 0 and out.strip() == A1111_TEXT and err == ""


def test_comfyui_graph_is_summarised(run_cli, tmp_path):
    path = png_with(tmp_path / "c.png", prompt=json.dumps(comfy_graph()), workflow=json.dumps({"nodes": []}))
    found = infotext.read(path)
    p = found.params
    assert found.source == "comfyui"
    assert (p.prompt, p.negative_prompt) == ("a red circle, masterpiece", "blurry")
    assert (p.sampler, p.schedule, p.steps, p.guidance, p.seed) == ("dpm++2m", "karras", 20, 8.0, 156680208700286)
    assert (p.width, p.height, p.model_name) == (64, 96, "v1-5-pruned")  # through the LoRA loader
    code, out, _ = run_cli("info", path)
    assert code == 0
    assert "KSampler node 3" in out and "prompt: a red circle, masterpiece" in out
    assert "sampler: dpmpp_2m, scheduler: karras, CFG: 8.0, seed: 156680208700286, size: 64x96" in out


def test_comfyui_links_to_primitive_nodes_are_followed(tmp_path):
    graph = comfy_graph(seed=["20", 0], steps=["21", 0])
    graph["20"] = {"class_type": "PrimitiveNode", "inputs": {"value": 5}}
    graph["21"] = {"class_type": "PrimitiveInt", "inputs": {"value": 9}}
    graph["3b"] = {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 1}}
    p = infotext.read(png_with(tmp_path / "c.png", prompt=json.dumps(graph))).params
    assert (p.seed, p.steps) == (5, 9)
    assert any("more KSampler" in x for x in p.unhonoured)


@pytest.mark.parametrize("chunk", [
    "{not json", "[1, 2, 3]", "{}", '"a string"', "null",
    json.dumps({"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}}}),  # no KSampler
    "[" * 100_000 + "]" * 100_000,  # nesting deeper than the JSON parser goes
])
def test_hostile_comfyui_chunks_are_one_line_errors(run_cli, tmp_path, chunk):
    path = png_with(tmp_path / "c.png", prompt=chunk)
    code, out, err = run_cli("info", path)
    assert code == 2 and out == ""
    assert err.startswith("t2i: error: ") and err.count("\n") == 1 and "ComfyUI" in err and "Traceback" not in err


@pytest.mark.parametrize("graph", [
    {"1": {"class_type": "KSampler", "inputs": {"positive": ["2", 0], "seed": ["2", 0], "steps": "x",
                                                "latent_image": ["1", 0], "model": ["1", 0]}},
     "2": {"class_type": "Reroute", "inputs": {"conditioning": ["1", 0], "value": ["2", 0]}}},  # cycles
    {"1": {"class_type": "KSampler", "inputs": {"positive": [["x"], 0], "cfg": {"a": 1}, "seed": 1e400,
                                                "sampler_name": 3, "scheduler": None}}},  # garbage values
    {"1": {"class_type": "KSampler", "inputs": {}}, "2": "not a node", "3": {"inputs": 5}},
])
def test_cyclic_and_garbage_graphs_summarise_what_they_can(run_cli, tmp_path, graph):
    path = png_with(tmp_path / "c.png", prompt=json.dumps(graph))
    found = infotext.read(path)
    assert found.source == "comfyui" and found.params.prompt == ""
    code, out, err = run_cli("info", path)
    assert code == 0 and "KSampler node 1" in out and err == ""


@pytest.mark.parametrize("exif", [
    b"Exif\0\0MM\0*\0\0\0\x08\0\x05\xff\xff",  # truncated IFD
    b"Exif\0\0II*\0\x08\0\0\0\x01\0\x69\x87\x04\0\x01\0\0\0\xff\xff\xff\x7f",  # Exif IFD offset past the end
    b"Exif\0\0garbage",
])
def test_malformed_exif_is_a_one_line_answer(run_cli, tmp_path, exif):
    path = tmp_path / "bad.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    code, out, err = run_cli("info", path)
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert "no generation metadata" in err or "malformed EXIF" in err


@pytest.mark.parametrize("comment", [b"UNICODE\0\xff", b"ASCII\0\0\0plain words, Steps: 1", b"\x00" * 3,
                                     b"UNICODE\0" + "a\nSteps: 3, Sampler: Euler, Seed: 1".encode("utf-16")])
def test_odd_user_comments_are_read_or_ignored(tmp_path, comment):
    exif = Image.Exif()
    exif.get_ifd(infotext.EXIF_IFD)[infotext.USER_COMMENT] = comment
    path = tmp_path / "odd.webp"
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    found = infotext.read(path)  # never raises
    if comment.endswith(b"1") and b"UNICODE" in comment:  # UTF-16 with a BOM
        assert found.params.steps == 3 and found.params.sampler == "Euler"


def test_not_an_image_and_no_metadata(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(UsageError, match="not a readable image"):
        infotext.read(junk)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert infotext.read(plain) is None
