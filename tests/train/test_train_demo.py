"""The demo model's training stages on a seconds-long config: they run, resume and export."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i.errors import UsageError
from t2i.train import demo
from t2i.train.checkpoint import Checkpoints

TINY = demo.CONFIGS / "tiny.toml"


def _run(root: Path, stage: str, resume="latest", **overrides):
    demo.run(str(TINY), stage, resume, {"output_dir": str(root), "export_dir": str(root / "model"), **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """All stages once, then the exported folder."""
    root = tmp_path_factory.mktemp("demo")
    _run(root, "all", **{"vae.decoder_steps": 2, "vae.tiny_steps": 2, "vae.tiny_channels": 8,
                         "unet.beta_schedule": "linear", "unet.beta_start": 1e-4, "unet.beta_end": 0.02,
                         "unet.prediction_type": "v_prediction", "unet.snr_floor": 1.0})
    return root


def test_all_stages_write_a_stock_diffusers_model(trained):
    from diffusers import StableDiffusionPipeline

    model = trained / "model"
    pipe = StableDiffusionPipeline.from_pretrained(str(model))  # no t2i code involved
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # every weight stored in fp16 (half the bundle), yet stock diffusers and transformers run them in fp32
    from safetensors import safe_open

    for weights in model.rglob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, weights
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32} == {p.dtype for p in pipe.unet.parameters()}
    assert json.loads((model / "t2i.json").read_text())["trained_unet_steps"] == 4
    assert (model / "tokenizer" / "vocab.json").is_file() and (model / "tokenizer" / "merges.txt").is_file()
    assert list((trained / "samples").glob("unet-*.png")), "sample grids are written during training"
    logs = [json.loads(l) for l in (trained / "unet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]


def test_the_exported_weights_get_the_same_file_mode_as_their_configs(trained):
    import stat

    # safetensors >= 0.8 writes 0600; a model only its trainer can read is no use to a web UI or container
    weights = sorted((trained / "model").rglob("*.safetensors"))
    assert len(weights) == 4  # unet, vae, text encoder, small decoder
    for path in weights:
        config = path.with_name("config.json")
        assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(config.stat().st_mode), path


def test_the_noise_schedule_is_the_configs_and_ships_with_the_model(trained):
    from diffusers import DDPMScheduler

    # Stable Diffusion's betas by default; the last step then keeps 6.8% of the image (the leak the
    # linear betas remove: the seed, not the prompt, would choose the background).
    assert demo.train_noise_scheduler().alphas_cumprod[-1].sqrt() == pytest.approx(0.0683, abs=1e-4)
    cfg = json.loads((trained / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]) == ("linear", 1e-4, 0.02)
    assert cfg["prediction_type"] == "v_prediction"
    assert DDPMScheduler.from_config(cfg).alphas_cumprod[-1].sqrt() < 0.007


def test_an_unknown_prediction_type_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="epsilon or v_prediction"):
        _run(tmp_path, "all", **{"unet.prediction_type": "sample"})
    assert not list(tmp_path.iterdir())  # not even the tokenizer stage ran


def test_the_small_decoder_ships_beside_the_model_and_decodes_its_latents(trained, run_cli, tmp_path):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(str(trained / "model" / "vae_tiny"))
    assert tiny.config.latent_channels == 4 and tiny.config.scaling_factor == 1.0
    logs = [json.loads(l) for l in (trained / "tiny_vae_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "mse" in r] == [1, 2] and any("val_psnr" in r for r in logs)
    code, stdout, stderr = run_cli("generate", "a red circle", "--model", trained / "model", "--steps", 2,
                                   "--speed", "tiny_vae", "--out", tmp_path, "-q")
    assert code == 0, stderr
    from PIL import Image

    assert Image.open(stdout.strip()).size == (64, 64)


def test_model_card_reports_the_measured_numbers(trained, tmp_path):
    import shutil

    from t2i.train.model_card import write_card

    folder = Path(shutil.copytree(trained / "model", tmp_path / "t2i-shapes"))
    summary = {"single_object": 0.5, "overall": 0.91, "held_out": 0.85}
    (tmp_path / "eval.json").write_text(json.dumps({"summary": summary}))
    card = write_card(folder, tmp_path / "eval.json", psnr=28.5, seeds=2, tiny_psnr=31.25).read_text()
    assert "| single object | 0.500 |" in card and "**28.50 dB**" in card and "2 seeds per prompt" in card
    assert "vae_tiny/ (not a pipeline part)" in card and "**31.25 dB**" in card
    assert "not all met yet: single_object, PSNR below target" in card
    assert "v-prediction objective" in card and "on linear betas (0.0001..0.02)" in card
    assert "VAE decoder: 2 more steps" in card
    assert "--through-vae" not in card  # no ceiling measured
    card = write_card(folder, tmp_path / "eval.json", psnr=28.5, seeds=2, ceiling=0.9913).read_text()
    assert "score **0.991** (`t2i eval --ground-truth --through-vae`)" in card
    assert "draw a" not in card  # trained without the layout task
    config = json.loads((folder / "training_config.json").read_text())
    config["text"].update(layout_steps=400, layout_batch=128, layout_cells=8)
    assert "the last run's mix" not in card  # the default scenes
    config["unet"].update(layout_weight=5.0, lr=1e-4, lr_schedule="cosine")
    config["scenes"].update(count=30.0, colorless=0.3, four=0.25)
    (folder / "training_config.json").write_text(json.dumps(config))
    card = write_card(folder, tmp_path / "eval.json", psnr=28.5, seeds=2, tiny_psnr=31.25).read_text()
    assert ("(the last run's mix: single 26%, count 26%, pair 17%, relation 22%, triple 9%; 30% of captions without"
            " colours; 25% of counting scenes with four objects)") in card
    assert "400 steps of batch 128, to draw the objects" in card and "grid of 8x8 cells" in card
    assert "kept that task on at weight 5" in card and "AdamW 0.0001 with a cosine decay to 5%" in card
    assert "Scheduler: DPM++ 2M, Karras schedule" in card and "20 steps, DPM++ 2M, Karras schedule," in card
    assert "UNet, VAE, text encoder, vae_tiny/ in fp16, which stock diffusers and transformers load as fp32" in card
    assert "guide/" not in card
    from safetensors.torch import load_file, save_file

    from t2i.models import guide

    unet = load_file(str(folder / "unet" / guide.UNET_FILE))
    (tmp_path / "step-00000002").mkdir()
    save_file({k: v.float() + 0.01 for k, v in unet.items()}, str(tmp_path / "step-00000002" / "ema_unet.safetensors"))
    guide.make(folder, tmp_path / "step-00000002", bits=2, scale=2.5, below=400)
    card = write_card(folder, tmp_path / "eval.json", psnr=28.5, seeds=2).read_text()
    assert "| guide/ (not a pipeline part) | the UNet of training checkpoint step-00000002, stored as its " \
           "difference from unet/ at 2 bits per weight: t2i's autoguidance (scale 2.5 below timestep 400) |" in card
    assert "`t2i guide --model t2i-shapes --from RUN/unet_checkpoints/step-00000002 --bits 2`" in card
    assert "guidance 5.0, autoguidance 2.5 with guide/ below timestep 400)" in card
    (folder / "t2i.json").write_text(json.dumps({"steps": 30, "guidance": 4.0, "sampler": "euler-a"}))
    card = write_card(folder, tmp_path / "eval.json", psnr=28.5, seeds=2).read_text()
    assert "Scheduler: Euler a, Uniform schedule" in card and "30 steps, Euler a, Uniform schedule," in card
    assert "num_inference_steps=30" in card


def test_export_makes_the_guide_from_an_earlier_checkpoint_of_the_run(trained, tmp_path, caplog):
    import shutil

    from t2i.models import guide
    from t2i.pipelines import Text2Image

    root = Path(shutil.copytree(trained, tmp_path / "run"))
    assert [s for s, _ in Checkpoints(root / "unet_checkpoints").all()] == [2, 4]
    _run(root, "export", **{"guide.step": 2, "guide.scale": 2.0})
    model = root / "model"
    assert (model / "guide" / guide.DELTA_FILE).is_file()
    defaults = json.loads((model / "t2i.json").read_text())
    assert (defaults["trained_unet_steps"], defaults["autoguidance"], defaults["autoguidance_below"]) == (4, 2.0, 500)
    pipe = Text2Image.from_pretrained(str(model), device="cpu", dtype="fp32")
    assert pipe.guide is not None and pipe.autoguidance == 2.0
    caplog.set_level(logging.INFO, logger="t2i.train")
    _run(root, "export", **{"guide.step": 4})  # not an earlier step: no guide, and the old one goes
    assert "no guide/ (not before the exported step" in caplog.text
    assert not (model / "guide").exists() and "autoguidance" not in json.loads((model / "t2i.json").read_text())


def test_a_guide_step_off_the_checkpoint_grid_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="multiple of unet.checkpoint_every"):
        _run(tmp_path, "all", **{"guide.step": 3})
    assert not list(tmp_path.iterdir())


def test_the_guides_checkpoint_outlives_pruning(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=1, pinned=(2,))
    for step in range(1, 5):
        ckpts.save(step, lambda folder: {})
    assert [s for s, _ in ckpts.all()] == [2, 4]


def test_tiny_vae_resume_continues_from_the_checkpoint(trained, tmp_path):
    import shutil

    shutil.copytree(trained / "vae", tmp_path / "vae")
    _run(tmp_path, "tiny_vae", **{"vae.tiny_steps": 2, "vae.tiny_channels": 8})
    _run(tmp_path, "tiny_vae", **{"vae.tiny_steps": 3, "vae.tiny_channels": 8})
    steps = [json.loads(l)["step"] for l in (tmp_path / "tiny_vae_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 3]  # losses 1, 2, checkpoint 2; resumed: loss 3, checkpoint 3


def test_tiny_vae_learns_generated_latents_from_a_pool_made_once(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(trained / "vae", tmp_path / "vae")
    args = {"vae.tiny_steps": 1, "vae.tiny_channels": 8, "vae.tiny_distill_from": str(trained / "model"),
            "vae.tiny_pool": 3}
    _run(tmp_path, "tiny_vae", **args)
    pool = load_file(str(tmp_path / "tiny_vae_pool.safetensors"))
    assert pool["latents"].shape == (3, 4, 16, 16) and pool["images"].shape == (3, 3, 64, 64)
    logs = [json.loads(l) for l in (tmp_path / "tiny_vae_log.jsonl").read_text().splitlines()]
    assert "generated_psnr_vs_vae" in logs[-1]
    (tmp_path / "tiny_vae_pool.safetensors").unlink()  # made again, the same (seeded)
    _run(tmp_path, "tiny_vae", **{**args, "vae.tiny_steps": 2})
    assert torch.equal(load_file(str(tmp_path / "tiny_vae_pool.safetensors"))["latents"], pool["latents"])


def test_tokenizer_keeps_world_words_whole(trained):
    from transformers import CLIPTokenizer

    from t2i.demo.shapes import caption_words

    tok = CLIPTokenizer.from_pretrained(str(trained / "tokenizer"))
    for word in caption_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_vae_scaling_factor_gives_unit_variance_latents(trained):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(trained / "vae"))
    images, _ = demo.scene_batch(demo.VAL_SEED + 10**6, 64)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
    assert 0.7 < float(z.std()) < 1.3


def test_unet_resume_equals_a_straight_run(tmp_path):
    """4 steps straight == 2 steps, stop, resume for 2 more: same weights (fp32, CPU)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    for root in (straight, split):
        _run(root, "tokenizer")
        _run(root, "vae")
    _run(straight, "unet")
    _run(split, "unet", **{"unet.steps": 2})
    _run(split, "unet", **{"unet.steps": 4})
    a = load_file(str(Checkpoints(straight / "unet_checkpoints").latest() / "unet.safetensors"))
    b = load_file(str(Checkpoints(split / "unet_checkpoints").latest() / "unet.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_vae_resume_continues_from_the_checkpoint(tmp_path):
    _run(tmp_path, "vae", **{"vae.steps": 2})
    assert Checkpoints(tmp_path / "vae_checkpoints").all()[-1][0] == 2
    _run(tmp_path, "vae", **{"vae.steps": 4})
    steps = [json.loads(l)["step"] for l in (tmp_path / "vae_log.jsonl").read_text().splitlines()]
    assert [s for s in steps][:3] == [1, 2, 2] and 4 in steps and steps.count(1) == 1  # no step redone


def test_unet_stage_without_vae_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="run them first"):
        _run(tmp_path, "unet")


def test_a_new_output_dir_takes_the_export_along_unless_one_is_given(tmp_path):
    """Two runs of one config with their own --output-dir must not export into the same folder."""
    own = demo.run_config("continue", {"output_dir": str(tmp_path / "a"), "export_dir": None})
    assert Path(own.export_dir) == tmp_path / "a" / "t2i-shapes"
    assert Path(demo.run_config(None, {"output_dir": str(tmp_path / "b")}).export_dir) == tmp_path / "b" / "t2i-shapes"
    given = demo.run_config("continue", {"output_dir": str(tmp_path / "a"), "export_dir": str(tmp_path / "m")})
    assert Path(given.export_dir) == tmp_path / "m"
    assert demo.run_config("continue").export_dir == "runs/continue/t2i-shapes"


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown config key unet.stepz"):
        _run(tmp_path, "tokenizer", **{"unet.stepz": 3})


def test_unet_can_start_from_an_exported_model(trained, tmp_path):
    """Without checkpoints, training continues from a bundled model's weights (a lost run's fallback): an
    empty run takes the model's tokenizer, VAE and small decoder, and exports a model that still has them."""
    _run(tmp_path, "unet", **{"unet.init_from": str(trained / "model"), "unet.steps": 5})
    logs = [json.loads(l) for l in (tmp_path / "unet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [5]  # continued at step 4, ran one step
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("vae_tiny", "diffusion_pytorch_model.safetensors"),
                       ("tokenizer", "vocab.json")):
        assert (tmp_path / part / name).read_bytes() == (trained / "model" / part / name).read_bytes(), part
    _run(tmp_path, "export")
    assert (tmp_path / "model" / "vae_tiny" / "config.json").is_file()


def test_a_cosine_rate_cools_down_over_the_runs_own_steps_also_after_a_resume(trained, tmp_path):
    """A run continued from a model (at its step 4) decays from its own first step to 5% at unet.steps; a
    resume from a checkpoint in the middle takes the same rates."""
    import shutil

    lr = 1e-3
    opts = {"unet.init_from": str(trained / "model"), "unet.steps": 10, "unet.lr": lr, "unet.warmup": 1,
            "unet.lr_schedule": "cosine", "keep_checkpoints": 10, "unet.sample_every": 100}
    _run(tmp_path, "unet", **opts)
    rates = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "unet_log.jsonl").read_text().splitlines())}
    assert sorted(rates) == [5, 6, 7, 8, 9, 10]
    assert rates[10] == pytest.approx(0.05 * lr) and rates[5] > 0.85 * lr  # the run's 6 steps, not 10
    assert all(rates[s] > rates[s + 1] for s in range(5, 10))
    for step, path in Checkpoints(tmp_path / "unet_checkpoints").all():
        if step > 6:
            shutil.rmtree(path)
    _run(tmp_path, "unet", **opts)  # resumes at 6
    again = [json.loads(l) for l in (tmp_path / "unet_log.jsonl").read_text().splitlines()][6:]
    assert [r["step"] for r in again] == [7, 8, 9, 10]
    assert [r["lr"] for r in again] == pytest.approx([rates[s] for s in (7, 8, 9, 10)])


def test_an_unknown_rate_schedule_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="constant or cosine"):
        _run(tmp_path, "all", **{"unet.lr_schedule": "linear"})
    assert not list(tmp_path.iterdir())  # not even the tokenizer stage ran


def test_a_bad_scene_mix_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="scene weights must be >= 0"):
        _run(tmp_path, "all", **{"scenes.count": -1.0})
    assert not list(tmp_path.iterdir())


def test_the_stages_train_on_the_configs_scene_mix(tmp_path):
    from types import SimpleNamespace

    one_process = SimpleNamespace(process_index=0, num_processes=1)
    only_counts = {f"scenes.{k}": 0.0 for k in ("single", "pair", "relation", "triple")}
    for overrides, counting in (({}, False), (only_counts, True)):
        cfg = demo.run_config(str(TINY), {"output_dir": str(tmp_path), **overrides})
        captions = [c for _, batch in demo.step_scenes(cfg, one_process, 5 * 10**7, 0, 3, 16) for c in batch]
        numbered = [c for c in captions if re.search(r"\b(one|two|three|1|2|3) ", c)]
        assert (len(numbered) == len(captions)) == counting, captions


def test_starting_from_a_model_never_replaces_the_runs_own_parts(trained, tmp_path):
    import shutil

    weights = "diffusion_pytorch_model.safetensors"
    own = (trained / "vae" / weights).read_bytes()  # the run's fp32 VAE, not the model's fp16 one
    assert own != (trained / "model" / "vae" / weights).read_bytes()
    shutil.copytree(trained / "vae", tmp_path / "vae")
    _run(tmp_path, "unet", **{"unet.init_from": str(trained / "model"), "unet.steps": 5})
    assert (tmp_path / "vae" / weights).read_bytes() == own


def test_starting_from_a_folder_without_a_unet_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="has no unet/diffusion_pytorch_model.safetensors"):
        _run(tmp_path, "unet", **{"unet.init_from": str(tmp_path / "nowhere")})
    assert not (tmp_path / "tokenizer").exists()


def test_the_layout_loss_trains_a_head_that_is_checkpointed_but_never_exported(tmp_path):
    """unet.layout_weight: the text encoder also learns to draw a coarse picture of the caption's scene."""
    _run(tmp_path, "tokenizer")
    _run(tmp_path, "vae")
    _run(tmp_path, "unet", **{"unet.layout_weight": 1.0, "text.layout_cells": 4, "unet.steps": 2})
    _run(tmp_path, "unet", **{"unet.layout_weight": 1.0, "text.layout_cells": 4, "unet.steps": 3})  # resumes
    logs = [json.loads(l) for l in (tmp_path / "unet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(r["layout_loss"] > 0 for r in logs)
    head = load_file(str(Checkpoints(tmp_path / "unet_checkpoints").latest() / "layout_head.safetensors"))
    assert head["net.3.weight"].shape[0] == 4 * 16  # coverage + RGB of 4 x 4 cells
    _run(tmp_path, "export")
    assert not list(Path(tmp_path / "model").rglob("*layout*"))


def test_a_negative_layout_weight_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="layout_weight"):
        _run(tmp_path, "unet", **{"unet.layout_weight": -1.0})


def test_the_text_stage_teaches_position_words_and_the_unet_starts_from_it(tmp_path):
    """text.layout_steps: after the stage, the encoder + head draw "on the left" left of "on the right"."""
    from transformers import CLIPTextModel, CLIPTokenizer

    _run(tmp_path, "tokenizer")
    _run(tmp_path, "vae")
    text = {"text.layout_steps": 200, "text.layout_batch": 128, "text.layout_cells": 4, "text.layout_lr": 3e-3,
            "text.checkpoint_every": 100}
    _run(tmp_path, "text", **text)
    logs = [json.loads(l) for l in (tmp_path / "text_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 201))
    _run(tmp_path, "text", **text)  # done: a rerun (as `--stage all` does) changes nothing
    assert len((tmp_path / "text_log.jsonl").read_text().splitlines()) == 200
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    te = CLIPTextModel.from_pretrained(str(tmp_path / "text")).eval()
    head = demo.LayoutHead(te.config.hidden_size, 4)
    head.load_state_dict(load_file(str(tmp_path / "text" / "layout_head.safetensors")))

    def centre_x(caption):
        ids = tok([caption], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            cover = head(te(ids).pooler_output)[0, 0].clamp(min=0)  # (4, 4) share of object pixels
        return float((cover.sum(0) * torch.arange(4.0)).sum() / cover.sum())

    assert centre_x("a red circle on the left") + 0.5 < centre_x("a red circle on the right")

    _run(tmp_path, "unet", **text, **{"unet.steps": 1, "unet.layout_weight": 1.0, "unet.lr": 0.0})  # lr 0: no change
    ck = Checkpoints(tmp_path / "unet_checkpoints").latest()
    started = load_file(str(tmp_path / "text" / "model.safetensors"))
    for name in ("text_encoder", "ema_text_encoder", "layout_head"):
        saved = load_file(str(ck / f"{name}.safetensors"))
        want = load_file(str(tmp_path / "text" / "layout_head.safetensors")) if name == "layout_head" else started
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want), name


def test_the_continue_config_trains_the_bundled_model_further(tmp_path):
    """train/configs/continue.toml on the real bundled model: `all` runs text, unet and export on the model's
    own tokenizer and VAE (no tokenizer or VAE stage runs), one step past the model's, and exports it."""
    from t2i.models.sources import bundled_model_path

    bundled = bundled_model_path()
    start = json.loads((bundled / "t2i.json").read_text())["trained_unet_steps"]
    config = demo.CONFIGS / "continue.toml"
    assert demo.run_config("continue").unet.steps > start, "the shipped recipe must go on past the shipped model"
    demo.run(str(config), "all", "latest", {"output_dir": str(tmp_path), "export_dir": str(tmp_path / "model"),
                                            "text.layout_steps": 2, "text.layout_batch": 8, "unet.batch": 4,
                                            "unet.steps": start + 1})
    assert not (tmp_path / "vae_log.jsonl").exists() and not (tmp_path / "vae_checkpoints").exists()
    logs = [json.loads(l) for l in (tmp_path / "unet_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [start + 1] and logs[0]["layout_loss"] > 0
    assert json.loads((tmp_path / "model" / "t2i.json").read_text())["trained_unet_steps"] == start + 1
    for part, name in (("vae", "diffusion_pytorch_model.safetensors"), ("tokenizer", "vocab.json"),
                       ("vae_tiny", "diffusion_pytorch_model.safetensors")):
        assert (tmp_path / "model" / part / name).read_bytes() == (bundled / part / name).read_bytes(), part
    with pytest.raises(UsageError, match=f"already trained {start} steps; set unet.steps above"):
        demo.run(str(config), "unet", "latest", {"output_dir": str(tmp_path / "b"), "unet.steps": start})
    with pytest.raises(UsageError, match="stage vae would replace the tokenizer and VAE"):
        demo.run(str(config), "vae", "latest", {"output_dir": str(tmp_path / "c")})


def test_scenes_rendered_ahead_by_workers_train_the_same_bits(tmp_path):
    """data_workers renders the coming steps' scenes in other processes: same batches, same losses, same
    weights as rendering them between steps; a resumed run's workers start at the resumed step."""
    runs = {}
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        _run(root, "tokenizer")
        _run(root, "vae", data_workers=workers)
        layout = {"unet.layout_weight": 1.0, "text.layout_cells": 4, "data_workers": workers}
        _run(root, "unet", **layout, **{"unet.steps": 2})
        _run(root, "unet", **layout, **{"unet.steps": 3})  # resumed at step 2
        runs[workers] = root
    for log in ("vae_log.jsonl", "unet_log.jsonl"):
        losses = [[(r["step"], r.get("loss", r.get("mse"))) for r in map(json.loads, (runs[w] / log).open())]
                  for w in (0, 2)]
        assert losses[0] == losses[1] and len(losses[0]) >= 3, log
    a, b = (load_file(str(Checkpoints(runs[w] / "unet_checkpoints").latest() / "ema_unet.safetensors")) for w in (0, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_negative_number_of_data_workers_is_refused(tmp_path):
    with pytest.raises(UsageError, match="data_workers must be >= 0"):
        _run(tmp_path, "tokenizer", data_workers=-1)


def test_max_minutes_stops_at_a_checkpoint_exports_and_the_same_command_goes_on(tmp_path, caplog):
    """For a lent machine: the time limit stops the running stage at its next checkpoint; a run of all stages
    still exports the newest UNet checkpoint; the same command then resumes from there."""
    caplog.set_level(logging.INFO, logger="t2i.train")
    _run(tmp_path, "all", max_minutes=1e-9)  # out of time at the VAE's first checkpoint: no UNet to export
    assert "vae: max_minutes (1e-09) ran out at step 2" in caplog.text
    assert not (tmp_path / "vae" / "config.json").exists() and not (tmp_path / "model").exists()
    _run(tmp_path, "vae")  # the VAE goes on from step 2
    assert [r["step"] for r in map(json.loads, (tmp_path / "vae_log.jsonl").open()) if "mse" in r] == [1, 2, 3, 4]
    caplog.clear()
    _run(tmp_path, "all", max_minutes=1e-9)  # the VAE is done; the UNet stops at its first checkpoint, exported
    assert "unet: max_minutes (1e-09) ran out at step 2" in caplog.text
    assert json.loads((tmp_path / "model" / "t2i.json").read_text())["trained_unet_steps"] == 2
    _run(tmp_path, "unet")
    assert [r["step"] for r in map(json.loads, (tmp_path / "unet_log.jsonl").open())] == [1, 2, 3, 4]
    with pytest.raises(UsageError, match="max_minutes must be >= 0"):
        _run(tmp_path, "unet", max_minutes=-1)


def test_continuing_a_model_without_the_text_stage_says_its_layout_head_is_new(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="t2i.train")
    _run(tmp_path, "unet", **{"unet.init_from": str(trained / "model"), "unet.steps": 5, "unet.layout_weight": 1.0,
                              "text.layout_cells": 4})
    assert "layout task's head starts untrained" in caplog.text


def test_the_cli_finds_a_shipped_config_by_name(run_cli, tmp_path):
    """`t2i train demo --config continue`: the shipped continue.toml (here its refusal of a VAE stage, which only
    that config's unet.init_from causes), also where no checkout's train/configs is around."""
    code, _, err = run_cli("train", "demo", "--config", "continue", "--stage", "vae", "--output-dir", tmp_path)
    assert code == 2 and "stage vae would replace the tokenizer and VAE" in err
    code, _, err = run_cli("train", "demo", "--config", "nonesuch", "--output-dir", tmp_path)
    assert code == 2 and "nonesuch" in err and "does not exist" in err
    with pytest.raises(UsageError, match="stage vae would replace"):  # the Python API takes the name too
        demo.run("continue", "vae", "latest", {"output_dir": str(tmp_path)})


def test_caption_extras_append_a_phrase_to_that_share_of_the_captions(tmp_path, monkeypatch):
    """unet.caption_extras = 1: every caption the UNet stage trains on ends with an extra phrase (2 steps of batch
    4: 8 phrases, each after ", "); 0 (the default): none."""
    from transformers import CLIPTokenizer

    from t2i.train.demo import unet_stages

    made, seen = [], []
    real_phrase, real_call = unet_stages.extra_phrase, CLIPTokenizer.__call__

    def phrase(rng):
        made.append(real_phrase(rng))
        return made[-1]

    def call(self, text, *args, **kwargs):
        if isinstance(text, list):
            seen.extend(text)
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(unet_stages, "extra_phrase", phrase)
    monkeypatch.setattr(CLIPTokenizer, "__call__", call)
    for root, share in ((tmp_path / "extras", 1.0), (tmp_path / "plain", 0.0)):
        _run(root, "tokenizer")
        _run(root, "vae")
        made.clear(), seen.clear()
        _run(root, "unet", **{"unet.steps": 2, "unet.caption_extras": share, "unet.sample_every": 100})
        if share:
            assert len(made) == 8
            assert sum(any(c.endswith(", " + p) for p in made) for c in seen) >= 8  # the training batches' captions
        else:
            assert made == [] and seen


def test_a_caption_extras_share_outside_0_1_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="unet.caption_extras is a share of captions"):
        _run(tmp_path, "all", **{"unet.caption_extras": 1.5})
    assert not list(tmp_path.iterdir())
