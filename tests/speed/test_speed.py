"""Speed options (t2i.speed) on the tiny random models: outputs stay close to the plain path, the feature
cache skips the deep blocks, every option undoes itself, and `t2i bench` runs end to end.

Tolerances, as the largest pixel difference (0-255) of an image from the plain path's:

    batched, channels_last, sdpa, no_sdpa, attention_slicing, compile (eager backend)   2
    bf16 (forced, CPU autocast)                                                         BF16_TOL
    vae_tiling (at the VAE's own tile size, where no tiling happens)                    0
    tiny_vae (another decoder: checked as exactly its decode of the same latents)      -
    cache2 / cache3 (changes images by design; far more on a trained model)             CACHE_TOL

No timing assertions: speed lives in `t2i bench`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_line, pixels
from t2i import speed
from t2i.bench import random_models
from t2i.errors import UsageError
from t2i.speed import SpeedOptions

ROUNDING_TOL = 2  # float rounding: another kernel or summation order, never another picture
BF16_TOL = 12  # an 8-bit mantissa through every layer (measured: 5)
CACHE_TOL = 16  # deep features of 1-2 calls before (measured: 2 here; 30 and 65 on the demo model, see README)
TOLERANCES = {"batched": ROUNDING_TOL, "channels_last": ROUNDING_TOL, "sdpa": ROUNDING_TOL,
              "no_sdpa": ROUNDING_TOL, "attention_slicing": ROUNDING_TOL, "compile=eager": ROUNDING_TOL,
              "bf16": BF16_TOL, "vae_tiling": 0, "cache2": CACHE_TOL, "cache3": CACHE_TOL}
ARGS = dict(prompt="a red circle", steps=4, seed=5, sampler="euler", progress=False)


def generate(pipe, **kwargs):
    """The pipeline's images on the exact path (the plain path these tolerances are from), or under the block's options."""
    args = ARGS | kwargs
    with speed.apply(pipe, SpeedOptions.off()) if pipe.speed_on is None else contextlib.nullcontext():
        return pipe(args.pop("prompt"), **args).images


def state(pipe) -> tuple:
    """What the switches touch: batch mode, UNet class, attention processors, memory format, VAE tiling."""
    unet, vae = pipe.pipe.unet, pipe.pipe.vae
    return (pipe.exact_batch, pipe.decoder, type(unet), "forward" in unet.__dict__,
            {k: type(v) for k, v in unet.attn_processors.items()}, {k: type(v) for k, v in vae.attn_processors.items()},
            unet.conv_in.weight.is_contiguous(), vae.decoder.conv_in.weight.is_contiguous(), vae.use_tiling)


@pytest.mark.parametrize("name", list(TOLERANCES))
def test_each_option_stays_within_its_tolerance_and_undoes_itself(sd_pipe, name):
    plain, before = generate(sd_pipe, batch=2), state(sd_pipe)
    with speed.apply(sd_pipe, SpeedOptions.parse(name)):
        fast = generate(sd_pipe, batch=2)
    after = generate(sd_pipe, batch=2)
    for p, f in zip(plain, fast):
        assert np.abs(pixels(f) - pixels(p)).max() <= TOLERANCES[name], name
    assert state(sd_pipe) == before
    assert [a.tobytes() for a in after] == [p.tobytes() for p in plain]  # bit-identical plain output again


def test_all_options_together_on_sdxl_undo_themselves(sdxl_pipe):
    plain, before = generate(sdxl_pipe), state(sdxl_pipe)
    options = SpeedOptions.parse("batched,channels_last,sdpa,attention_slicing,vae_tiling,cache2")
    with speed.apply(sdxl_pipe, options) as cache:
        fast = generate(sdxl_pipe)
        assert cache.full_calls == 2 and cache.shallow_calls == 2  # SDXL's text-time embedding on the shallow path
    assert np.abs(pixels(fast[0]) - pixels(plain[0])).max() <= CACHE_TOL
    assert state(sdxl_pipe) == before
    assert generate(sdxl_pipe)[0].tobytes() == plain[0].tobytes()


def test_feature_cache_runs_the_deep_blocks_every_nth_call_and_starts_over_each_call(sd_pipe):
    deep = []  # one entry per call of the UNet's deepest block
    hook = sd_pipe.pipe.unet.down_blocks[-1].register_forward_hook(lambda m, a, o: deep.append(o[0].shape[0]))
    try:
        with speed.apply(sd_pipe, SpeedOptions.parse("cache3")) as cache:
            generate(sd_pipe, steps=7, batch=2, guidance=7.0)
            assert len(deep) == 3 and cache.full_calls == 3 and cache.shallow_calls == 4  # calls 1, 4, 7 of 7
            assert deep == [4, 4, 4]  # one call for 2 images x (uncond, cond): classifier-free guidance's batch
            generate(sd_pipe, steps=2)  # a new call with another batch size starts with a full call
            assert len(deep) == 4 and cache.shallow_calls == 5
            deep.clear()
            generate(sd_pipe, steps=3, sampler="heun")  # two UNet calls per step, timesteps repeat: 5 calls
            assert len(deep) == 2 and cache.full_calls + cache.shallow_calls == 7 + 2 + 5
    finally:
        hook.remove()


@pytest.mark.parametrize("which", ["sd_pipe", "sdxl_pipe"])
def test_a_shallow_call_right_after_a_full_one_rebuilds_the_full_output_at_every_cut(request, which):
    """The shallow path's wiring (which skip each layer reads) checked exactly: with the deep feature just kept
    from the same inputs, the shallow call must give the full call's output, at every cut of the last up block."""
    pipe = request.getfixturevalue(which)
    unet = pipe.pipe.unet
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and 6 size/crop ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled), "time_ids": torch.ones(2, 6) * 32}}
    n = len(unet.up_blocks[-1].resnets)
    for layers in range(n + 1):
        cache = speed.FeatureCache(unet, 2, layers=layers)
        with torch.no_grad(), cache.keeping():
            full = unet(sample, 500, context, **added).sample
            shallow = cache.shallow(sample, torch.tensor(500), context, **added).sample
        assert torch.allclose(shallow, full, atol=1e-5), (which, layers, (shallow - full).abs().max())
    with pytest.raises(UsageError, match="last up block has"):
        speed.FeatureCache(unet, 2, layers=n + 1)


def test_cache_layers_parse_and_run_fewer_layers(sd_pipe):
    assert SpeedOptions.parse("cache3:1").names() == ["cache3:1"]
    assert (SpeedOptions.parse("cache3:1").cache_interval, SpeedOptions.parse("cache3:1").cache_layers) == (3, 1)
    for bad in ("cache3:", "cache3:0", "cache:1"):
        with pytest.raises(UsageError, match="unknown speed option"):
            SpeedOptions.parse(bad)
    plain = generate(sd_pipe, steps=6)[0]
    with speed.apply(sd_pipe, SpeedOptions.parse("cache3:1")) as cache:
        fast = generate(sd_pipe, steps=6)[0]
        assert (cache.full_calls, cache.shallow_calls) == (2, 4)
    assert np.abs(pixels(fast) - pixels(plain)).max() <= CACHE_TOL


def test_cache_of_one_and_the_plain_options_change_nothing(sd_pipe):
    plain = generate(sd_pipe)[0]
    with speed.apply(sd_pipe, SpeedOptions.off()) as cache:
        assert cache is None and generate(sd_pipe)[0].tobytes() == plain.tobytes()
    with speed.apply(sd_pipe, SpeedOptions.parse("cache1")) as cache:
        assert cache is None and generate(sd_pipe)[0].tobytes() == plain.tobytes()


def test_vae_tiling_tiles_images_larger_than_the_tile(sd_pipe):
    vae, calls = sd_pipe.pipe.vae, []
    vae.tiled_decode = lambda *a, f=vae.tiled_decode, **k: calls.append(1) or f(*a, **k)
    try:
        with speed.apply(sd_pipe, SpeedOptions.parse("vae_tiling")):
            image = generate(sd_pipe, width=64, height=64)[0]
    finally:
        del vae.tiled_decode
    assert calls and image.size == (64, 64) and vae.use_tiling is False


def test_bf16_weights_auto_follow_the_cpu_flags(sd_pipe, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(speed.options, "cpu_has_bf16", lambda: False)
    assert SpeedOptions().resolved(cpu).bf16_weights is False
    monkeypatch.setattr(speed.options, "cpu_has_bf16", lambda: True)
    resolved = SpeedOptions().resolved(cpu)
    assert resolved.bf16_weights is True and resolved.bf16_vae is True and resolved.bf16 is False  # not autocast
    assert SpeedOptions(bf16_weights=False).resolved(cpu).bf16_weights is False


def test_bad_options_are_one_line_usage_errors_and_change_nothing(sd_pipe):
    before = state(sd_pipe)
    with pytest.raises(UsageError, match="cpu_offload needs a CUDA device"):
        with speed.apply(sd_pipe, SpeedOptions.parse("batched,channels_last,cpu_offload")):
            pass
    assert state(sd_pipe) == before
    for bad in ("turbo", "cache0", "cachex", "batched=2"):
        with pytest.raises(UsageError, match="unknown speed option"):
            SpeedOptions.parse(bad)
    assert SpeedOptions.parse("batched, cache3,no_sdpa").names() == ["batched", "no_sdpa", "cache3"]


def test_bench_cli_prints_the_table_and_writes_json(run_cli, tiny_sd, tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_cli("bench", "--model", tiny_sd, "--steps", 2, "--repeats", 1, "--flops",
                                   "--options", "batched,cache2", "--json", out)
    assert code == 0, stderr
    names = ["stock diffusers", "stock diffusers bf16", "t2i", "t2i auto (batched)", "t2i + batched",
             "t2i + cache2", "t2i + batched + cache2"]
    assert all(n in stdout for n in names) and "GFLOP/s" in stdout and "matmul peak" in stdout
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == names
    assert data["rows"][2]["max_diff"] == 0  # t2i's plain path makes stock diffusers' image exactly
    assert data["info"]["unet_gflop"] > 0 and data["rows"][0]["step_gflops"] > 0
    assert data["info"]["matmul_gflops_bf16"] > 0 and data["rows"][1]["peak_share"] > 0  # of the bf16 peak
    assert data["rows"][5]["step_gflops"] is None  # a cached step is not a full UNet's FLOPs


def test_bench_cli_refuses_bad_options_before_loading(run_cli, tiny_sd, no_model_load):
    code, _, stderr = run_cli("bench", "--model", tiny_sd, "--options", "batched,cache0")
    assert code == 2 and "unknown speed option 'cache0'" in one_line(stderr)
    code, _, stderr = run_cli("bench", "--model", tiny_sd, "--arch", "sd15")
    assert code == 2 and "not allowed with argument" in one_line(stderr)


def test_bench_arch_builds_a_random_model_of_the_named_layout(run_cli, monkeypatch):
    tiny = {"unet": dict(sample_size=8, layers_per_block=1, block_out_channels=[32, 32], cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8,
                         down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
            "text_encoder": dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32),
            "vae": dict(block_out_channels=[8, 16], norm_num_groups=8, sample_size=16,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
            "tiny_vae": dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8],
                             num_encoder_blocks=[1, 1], num_decoder_blocks=[1, 1])}
    monkeypatch.setitem(random_models.ARCHS, "sd15", tiny)  # the real size takes minutes on a CPU
    code, stdout, stderr = run_cli("bench", "--arch", "sd15", "--steps", 1, "--repeats", 1, "--options",
                                   "batched,tiny_vae")
    assert code == 0, stderr
    assert "random-sd15 (sd1)" in stdout and "GFLOP/s" in stdout and "t2i + batched" in stdout
    assert "t2i + tiny_vae" in stdout  # a random small decoder of the arch's size, built beside the model


def test_generate_speed_flag_is_recorded_and_reproduce_replays_the_whole_batched_call(run_cli, tiny_sd, tmp_path):
    from t2i import metadata

    out = tmp_path / "o"
    code, stdout, stderr = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 4, "--seed", 5,
                                   "--batch", 3, "--speed", "batched,cache2", "--out", out, "-q")
    assert code == 0, stderr
    paths = stdout.split()
    settings = metadata.read(paths[1])[1]
    assert settings.speed == ["batched", "cache2"] and (settings.batch_index, settings.batch_size) == (1, 3)
    code, stdout, stderr = run_cli("reproduce", paths[1], "-q")  # replays seeds 5..7 in one call, keeps image 1
    assert code == 0 and "bit for bit" in stdout, stdout + stderr
    code, stdout, _ = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 4, "--seed", 6,
                              "--out", tmp_path / "plain.png", "-q")
    assert metadata.read(stdout.strip())[1].speed == ["batched"]  # no --speed: auto (fp32 without bf16 instructions)
    from PIL import Image

    assert 0 < np.abs(pixels(Image.open(stdout.strip())) - pixels(Image.open(paths[1]))).max() <= CACHE_TOL


def test_generate_refuses_a_bad_speed_option_before_loading(run_cli, tiny_sd, no_model_load, tmp_path):
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--speed", "batched,turbo", "--out", tmp_path)
    assert code == 2 and "unknown speed option 'turbo'" in one_line(stderr)
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--speed", "cpu_offload", "--device", "cpu",
                              "--out", tmp_path)
    assert code == 2 and "cpu_offload needs a CUDA device" in one_line(stderr)


# ---------------------------------------------------------------------------------------------- tiny_vae


def _tiny_vae(folder: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A random TAESD-style AutoencoderTiny with the tiny SD model's scale (2 levels: 2x)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
                    num_decoder_blocks=[1, 1], latent_channels=latent_channels).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def taesd(tmp_path_factory) -> Path:
    return _tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd")


def test_tiny_vae_decodes_the_same_latents_with_the_small_decoder_and_undoes_itself(sd_pipe, taesd):
    from diffusers import AutoencoderTiny

    kept = []
    real_decode = type(sd_pipe)._decode
    plain, before = generate(sd_pipe, batch=2), state(sd_pipe)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(sd_pipe), "_decode", lambda self, latents: kept.append(latents) or real_decode(self, latents))
        with speed.apply(sd_pipe, SpeedOptions.parse(f"tiny_vae={taesd}")) as _:
            assert isinstance(sd_pipe.decoder, AutoencoderTiny)
            fast = generate(sd_pipe, batch=2)
        generate(sd_pipe, batch=2)
    assert torch.equal(kept[0], kept[1])  # same UNet latents: only the decoder changed
    tiny = AutoencoderTiny.from_pretrained(str(taesd)).eval()
    with torch.no_grad():  # it reads the UNet's latents as they are (scaling factor 1), one image at a time
        want = torch.cat([tiny.decode(kept[0][i : i + 1]).sample for i in range(2)])
    want = sd_pipe.pipe.image_processor.postprocess(want, output_type="pil")
    assert [f.tobytes() for f in fast] == [w.tobytes() for w in want]
    assert [f.tobytes() for f in fast] != [p.tobytes() for p in plain]
    assert state(sd_pipe) == before
    assert [a.tobytes() for a in generate(sd_pipe, batch=2)] == [p.tobytes() for p in plain]


def test_tiny_vae_without_a_path_reads_the_model_folders_own(sd_copy, taesd):
    import shutil

    from t2i.pipelines import Text2Image

    pipe = Text2Image.from_pretrained(str(sd_copy), device="cpu")
    with pytest.raises(UsageError, match="this model has no vae_tiny/ folder; give a tiny VAE with --speed tiny_vae="):
        with speed.apply(pipe, SpeedOptions.parse("tiny_vae")):
            pass
    assert pipe.decoder is None
    shutil.copytree(taesd, sd_copy / "vae_tiny")
    with speed.apply(pipe, SpeedOptions.parse("tiny_vae")) as _:
        assert pipe.decoder is not None and generate(pipe)[0].size == (32, 32)
    assert SpeedOptions.parse("batched,tiny_vae").names() == ["batched", "tiny_vae"]
    assert SpeedOptions.parse(f"tiny_vae={taesd}").names() == [f"tiny_vae={taesd}"]


def test_tiny_vae_refuses_what_is_not_a_safe_matching_tiny_vae(sd_pipe, tiny_sd, taesd, tmp_path):
    import shutil

    from t2i.errors import ModelLoadError, UnsafeFileError

    cases = {"missing": (tmp_path / "nothing", UsageError, "not a folder"),
             "kl": (Path(tiny_sd) / "vae", ModelLoadError, r"is not an AutoencoderTiny \(its config says AutoencoderKL\)"),
             "channels": (_tiny_vae(tmp_path / "c8", latent_channels=8), UsageError, "decodes 8-channel latents")}
    pickled = Path(shutil.copytree(taesd, tmp_path / "pickled"))
    weights = pickled / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), pickled / "diffusion_pytorch_model.bin")
    weights.unlink()
    cases["pickle"] = (pickled, UnsafeFileError, "only pickle-based weights")
    before = state(sd_pipe)
    for name, (folder, error, message) in cases.items():
        with pytest.raises(error, match=message):
            with speed.apply(sd_pipe, SpeedOptions.parse(f"tiny_vae={folder}")):
                pass
        assert state(sd_pipe) == before, name


def test_generate_with_tiny_vae_records_it_and_reproduce_replays_it(run_cli, tiny_sd, taesd, tmp_path):
    from t2i import metadata

    code, stdout, stderr = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 3,
                                   "--speed", f"tiny_vae={taesd}", "--out", tmp_path, "-q")
    assert code == 0, stderr
    assert metadata.read(stdout.strip())[1].speed == [f"tiny_vae={taesd}"]
    code, out, stderr = run_cli("reproduce", stdout.strip(), "-q")
    assert code == 0 and "bit for bit" in out, out + stderr


def test_generate_refuses_a_missing_tiny_vae_before_loading(run_cli, tiny_sd, no_model_load, tmp_path):
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--speed", f"tiny_vae={tmp_path / 'no'}",
                              "--out", tmp_path)
    assert code == 2 and "not a folder; give an AutoencoderTiny folder" in one_line(stderr)
    code, _, stderr = run_cli("generate", "a", "--model", tiny_sd, "--speed", "tiny_vae", "--out", tmp_path)
    assert code == 2 and "this model has no vae_tiny/ folder" in one_line(stderr)
