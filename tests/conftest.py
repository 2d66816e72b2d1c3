"""Shared fixtures: tiny random SD 1.x and SDXL folders, built once per session.

Everything here is tier 1 (see STYLE.md): random weights, 32x32 images, two
steps. The models are saved as ordinary diffusers folders so every test goes
through the same vetting and loading code a real model does.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, as a plain module

import tiny_models  # noqa: E402

# Models this small spend their time starting threads, not computing; one thread
# is faster and keeps a busy CI machine from oversubscribing its cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """t2i's hash cache in a temporary folder, never under ~."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("T2I_CACHE", str(tmp_path_factory.mktemp("t2i-cache")))
        # `--speed auto` as on a CPU without bf16 instructions, whatever CPU runs the suite (subprocesses too):
        # on one with AMX it would pick bf16 weights, and the bit-exact expectations are fp32's.
        # Tests of the bf16 choice turn it on with the `cpu_bf16` fixture.
        mp.setenv("T2I_CPU_BF16", "0")
        yield


@pytest.fixture
def cpu_bf16(monkeypatch):
    """`--speed auto` decides as on a CPU with AMX/AVX512-BF16 (bf16 itself runs on any CPU, slowly: tiny models)."""
    monkeypatch.setenv("T2I_CPU_BF16", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tiny_models.tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny SD 1.x diffusers folder (32x32 images). Treat as read-only; copy it to change it."""
    return tiny_models.build_sd(tmp_path_factory.mktemp("models") / "tiny-sd", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny SDXL diffusers folder (32x32 images). Treat as read-only."""
    return tiny_models.build_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", tokenizer_dir)


@pytest.fixture(scope="session")
def sd_pipe(tiny_sd):
    """Text2Image over the tiny SD model, loaded once; tests must leave it as they found it."""
    from t2i.pipelines import Text2Image

    return Text2Image.from_pretrained(str(tiny_sd), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl):
    from t2i.pipelines import Text2Image

    return Text2Image.from_pretrained(str(tiny_sdxl), device="cpu", dtype="fp32")


@pytest.fixture
def sd_copy(tiny_sd, tmp_path) -> Path:
    """A private copy of the tiny SD folder that a test may damage."""
    return Path(shutil.copytree(tiny_sd, tmp_path / "model"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model (for checks that must come first)."""
    from t2i import models
    from t2i.pipelines import Text2Image

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(Text2Image, "from_pretrained", refuse)
    monkeypatch.setattr(models, "load", refuse)


@pytest.fixture
def run_cli(capsys):
    """t2i.cli.main in-process: returns (exit code, stdout, stderr); argparse's exits count as codes."""
    from t2i.cli import main

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # --help, --version and argparse's own errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def marker(tmp_path) -> Path:
    """Where the pickle payloads write when they run; it must never appear."""
    return tmp_path / "PWNED"


@pytest.fixture
def evil(marker, tmp_path):
    """evil(name) -> a file of that name that runs code when unpickled (torch.save's zip or a raw pickle)."""
    import pickle

    from helpers import Payload

    def make(name: str, zip_format: bool = False) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if zip_format:
            torch.save({"state_dict": Payload(marker)}, path)
        else:
            path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
        return path

    return make


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory, tiny_sd) -> Path:
    """A small random LoRA on the tiny UNet's attention, saved the way diffusers saves LoRAs."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd / "unet"))
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))  # random B: the LoRA changes the output
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="ink.safetensors")
    return folder / "ink.safetensors"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A LoRA training set: six small captioned images, two of them wide (a second bucket)."""
    folder = tmp_path_factory.mktemp("data")
    colors = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (230, 220, 40), (240, 240, 240), (20, 20, 20)]
    for i, c in enumerate(colors):
        size = (64, 32) if i >= 4 else (32, 32)
        img = Image.new("RGB", size, c)
        img.paste((255 - c[0], 255 - c[1], 255 - c[2]), (8, 8, 20, 20))
        img.save(folder / f"{i}.png")
        if i != 3:  # one image without caption: trained on the trigger alone
            (folder / f"{i}.txt").write_text(f"a square number {i}")
    return folder


@pytest.fixture(scope="session")
def finished(tiny_sd, data, tmp_path_factory) -> tuple[Path, dict]:
    """A two-step LoRA run with one checkpoint (step 2), to be copied and damaged."""
    from helpers import lora_cfg
    from t2i.train import lora

    out = tmp_path_factory.mktemp("finished") / "out"
    cfg = lora_cfg(tiny_sd, data, out, steps=2, checkpoint_every=2)
    lora.run(None, cfg)
    return out, cfg
