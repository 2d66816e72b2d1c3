"""A1111's everyday set (issue 29): clip skip, a VAE override, the hires fix.

Tiny random models for the mechanics (what each feature computes, that the metadata says it in A1111's
words, that `t2i reproduce` replays it bit for bit); the bundled model once for hires end to end.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import one_line, pixels
from t2i import metadata, prompts
from t2i.errors import UsageError
from t2i.pipelines import Image2Image
from t2i.pipelines.hires import UPSCALERS, Hires, Plan, plan, upscale_image, upscale_latents
from t2i.reproduce import reproduce

sys.path.insert(0, str(Path(__file__).parent.parent))
import ldm_format  # noqa: E402

FAST = dict(steps=3, seed=11, progress=False)


# --------------------------------------------------------------------------- clip skip


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_layer_norm(sd_pipe):
    tok, enc = sd_pipe.pipe.tokenizer, sd_pipe.pipe.text_encoder
    ids, _ = prompts._window(tok, prompts.tokenize(tok, "red circle")[0], enc.device)
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
        want = enc.final_layer_norm(out.hidden_states[-2])  # (1, 77, D), A1111's sd_hijack_clip
    got = prompts.encode_sd(tok, enc, "red circle", clip_skip=2).embeds
    assert torch.equal(got, want)
    assert torch.equal(prompts.encode_sd(tok, enc, "red circle", clip_skip=1).embeds, out.last_hidden_state)
    assert not torch.allclose(got, out.last_hidden_state)


def test_clip_skip_changes_the_image_is_recorded_and_reproduces(sd_pipe, tmp_path):
    plain = sd_pipe("a red circle", **FAST)
    sd_pipe.clip_skip = 2
    try:
        skipped = sd_pipe("a red circle", **FAST)
    finally:
        sd_pipe.clip_skip = 1
    assert np.abs(pixels(plain.images[0]) - pixels(skipped.images[0])).max() > 0
    assert skipped.settings[0].clip_skip == 2
    text = metadata.a1111_parameters(skipped.settings[0])
    assert metadata.parse_a1111(text)["Clip skip"] == "2"
    assert "Clip skip" not in metadata.a1111_parameters(plain.settings[0])  # A1111 writes it above 1 only
    path = skipped.save(tmp_path / "skip.png")[0]
    assert reproduce(path, progress=False).identical


def test_clip_skip_leaves_sdxl_as_a1111_does(sdxl_pipe):
    plain = sdxl_pipe("a red circle", **FAST)
    sdxl_pipe.clip_skip = 2
    try:
        skipped = sdxl_pipe("a red circle", **FAST)
    finally:
        sdxl_pipe.clip_skip = 1
    assert np.array_equal(pixels(plain.images[0]), pixels(skipped.images[0]))
    assert skipped.settings[0].clip_skip == 2  # recorded, as A1111 writes it, though it changes nothing


def test_clip_skip_beyond_the_encoder_is_one_line_before_loading(run_cli, tiny_sd, tmp_path, no_model_load):
    code, out, err = run_cli("generate", "a", "--model", tiny_sd, "--clip-skip", 3, "--out", tmp_path / "o")
    assert code == 2 and out == ""
    assert "clip skip 3 is beyond" in one_line(err) and "1 .. 2" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- VAE override


@pytest.fixture(scope="session")
def other_vae(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """A VAE unlike the tiny model's, as a diffusers folder and as single files in the original layout."""
    from diffusers import AutoencoderKL

    out = tmp_path_factory.mktemp("vae")
    vae = AutoencoderKL.from_pretrained(str(tiny_sd / "vae"))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(str(out / "folder"))
    ldm = {k: v.contiguous() for k, v in ldm_format.vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
    save_file({f"first_stage_model.{k}": v for k, v in ldm.items()}, str(out / "prefixed.vae.safetensors"))
    save_file(ldm, str(out / "plain.safetensors"))
    return {"folder": out / "folder", "prefixed": out / "prefixed.vae.safetensors", "plain": out / "plain.safetensors",
            "dir": out}


def test_a_vae_override_changes_pixels_and_a_single_file_equals_its_folder(sd_pipe, other_vae):
    own = sd_pipe("a red circle", **FAST)
    made = {}
    try:
        for kind in ("folder", "prefixed", "plain"):
            made[kind] = sd_pipe.set_vae(other_vae[kind])("a red circle", **FAST)
    finally:
        sd_pipe.set_vae(None)
    back = sd_pipe("a red circle", **FAST)
    assert np.abs(pixels(own.images[0]) - pixels(made["folder"].images[0])).max() > 0
    for kind in ("prefixed", "plain"):
        assert np.array_equal(pixels(made[kind].images[0]), pixels(made["folder"].images[0])), kind
    assert np.array_equal(pixels(back.images[0]), pixels(own.images[0]))  # set_vae(None): the model's own again


def test_vae_metadata_is_a1111s_and_reproduces(sd_pipe, other_vae, tmp_path):
    try:
        result = sd_pipe.set_vae(other_vae["prefixed"])("a red circle", **FAST)
    finally:
        sd_pipe.set_vae(None)
    s = result.settings[0]
    sha = hashlib.sha256(other_vae["prefixed"].read_bytes()).hexdigest()
    fields = metadata.parse_a1111(metadata.a1111_parameters(s))
    assert fields["VAE hash"] == sha[:10] and fields["VAE"] == "prefixed.vae.safetensors"  # A1111's sd_vae
    assert "VAE" not in metadata.parse_a1111(metadata.a1111_parameters(sd_pipe("a", **FAST).settings[0]))
    path = result.save(tmp_path / "vae.png")[0]
    assert reproduce(path, progress=False).identical


def test_cli_vae_by_name_in_vae_dir(run_cli, tiny_sd, other_vae, tmp_path):
    code, out, err = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 1, "--vae",
                             "prefixed", "--vae-dir", other_vae["dir"], "--out", tmp_path / "a.png", "-q")
    assert code == 0, err
    _, settings = metadata.read(tmp_path / "a.png")
    assert Path(settings.vae) == other_vae["prefixed"] and settings.vae_name == "prefixed.vae.safetensors"


def test_an_unknown_vae_is_one_line_before_loading(run_cli, other_vae, tmp_path, no_model_load):
    code, _, err = run_cli("generate", "a", "--vae", "prefixd", "--vae-dir", other_vae["dir"], "--out", tmp_path)
    assert code == 2 and "VAE prefixd does not exist" in one_line(err) and "prefixed" in err


def test_a_pickle_vae_needs_allow_pickle(run_cli, sd_pipe, other_vae, tmp_path, tiny_sd):
    from safetensors.torch import load_file

    pt = tmp_path / "old.vae.pt"
    torch.save({"state_dict": load_file(str(other_vae["prefixed"]))}, pt)
    code, _, err = run_cli("generate", "a", "--model", tiny_sd, "--vae", pt, "--out", tmp_path / "o")
    assert code == 2 and "pickle" in one_line(err) and "--allow-pickle" in err
    try:
        from_pickle = sd_pipe.set_vae(pt, allow_pickle=True)("a red circle", **FAST)
        from_file = sd_pipe.set_vae(other_vae["prefixed"])("a red circle", **FAST)
    finally:
        sd_pipe.set_vae(None)
    assert np.array_equal(pixels(from_pickle.images[0]), pixels(from_file.images[0]))


# --------------------------------------------------------------------------- hires fix


def test_hires_steps_run_as_a1111_runs_them():
    """N hires steps at strength d: the last N of int(N / d) steps (A1111's setup_img2img_steps, steps given)."""
    assert Hires(steps=10, denoise=0.7).schedule(20) == (14, 10.5 / 14)
    assert Hires(steps=0, denoise=1.0).schedule(20) == (20, 1.0)  # 0: the first pass's steps
    for n in range(1, 60):
        for d in (0.01, 0.1, 0.33, 0.5, 0.7, 0.75, 0.9, 0.999, 1.0):
            total, strength = Hires(steps=n, denoise=d).schedule(5)
            assert int(total * strength) == n and total >= n  # what diffusers' img2img then runs


def test_hires_sizes_follow_a1111():
    assert plan(Hires(scale=2), 32, 24) == Plan(64, 48, 64, 48)
    p = plan(Hires(scale=1.5), 40, 32)
    assert (p.out_w, p.out_h) == (56, 48)  # int(60) and int(48), floored to multiples of 8
    p = plan(Hires(width=64), 32, 24)
    assert (p.out_w, p.out_h) == (64, 48)  # the other side in the first pass's ratio
    p = plan(Hires(width=64, height=64), 32, 24)
    assert (p.up_w, p.up_h, p.out_w, p.out_h) == (80, 64, 64, 64)  # covered (85 -> 10 latent cells), cropped
    with pytest.raises(UsageError, match="multiple of 8"):
        Hires(width=60).checked()
    with pytest.raises(UsageError, match="did you mean"):
        Hires(upscaler="latnet").checked()
    assert Hires(upscaler="Latent (bicubic antialiased)").checked().upscaler == "latent-bicubic-antialiased"


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_equals_txt2img_upscale_img2img_by_hand(sd_pipe, upscaler):
    sd_pipe.speed = "exact"  # auto batches the UNet: a batch's images equal single runs only to within rounding
    try:
        _hires_by_hand(sd_pipe, upscaler)
    finally:
        sd_pipe.speed = "auto"


def _hires_by_hand(sd_pipe, upscaler):
    hires = Hires(scale=2, steps=4, denoise=0.6, upscaler=upscaler)
    result = sd_pipe("a red circle", **FAST, batch=2, hires=hires)
    assert [im.size for im in result.images] == [(64, 64)] * 2
    assert result.settings[1].seed == 12 and result.settings[0].width == 32  # Size: the first pass, as A1111
    f = sd_pipe.vae_scale_factor
    p = plan(hires, 32, 32, f)
    img2img = Image2Image.from_pipe(sd_pipe)
    for i, seed in enumerate((11, 12)):
        if upscaler == "latent":  # the first pass's latents, never decoded
            first = sd_pipe._generate(sd_pipe._settings("a red circle", None, 3, None, None, seed, 32, 32, 1, []),
                                      False, sd_pipe._inputs, decode=lambda x: [x]).images[0]
            init = upscale_latents(first, p, upscaler, f)
        else:
            first = sd_pipe("a red circle", steps=3, seed=seed, progress=False).images[0]
            init = upscale_image(first, p, upscaler, f)
        # A1111's hires steps: 4 steps at 0.6 are the last 4 of int(4 / 0.6) = 6
        by_hand = img2img._generate(img2img._settings("a red circle", None, 6, None, None, seed, 64, 64, 1, []),
                                    False, lambda g: {"image": init if upscaler == "latent" else [init],
                                                      "strength": 4.5 / 6, "generator": img2img._generators(g)})
        assert np.array_equal(pixels(result.images[i]), pixels(by_hand.images[0])), (upscaler, i)


def test_hires_metadata_is_a1111s_and_reproduces(sd_pipe, tmp_path):
    result = sd_pipe("a red circle", **FAST, hires=Hires(scale=2, steps=5, upscaler="nearest"))
    fields = metadata.parse_a1111(metadata.a1111_parameters(result.settings[0]))
    assert fields["Size"] == "32x32" and fields["Hires upscale"] == "2" and fields["Hires steps"] == "5"
    assert fields["Hires upscaler"] == "Nearest" and fields["Denoising strength"] == "0.7"
    resized = sd_pipe("a red circle", **FAST, hires=Hires(width=64, height=48))
    fields = metadata.parse_a1111(metadata.a1111_parameters(resized.settings[0]))
    assert fields["Hires resize"] == "64x48" and "Hires upscale" not in fields and "Hires steps" not in fields
    for r, name in ((result, "a.png"), (resized, "b.png")):
        path = r.save(tmp_path / name)[0]
        report = reproduce(path, progress=False)
        assert report.identical, report.summary()


def test_hires_progress_bar_covers_both_passes(sd_pipe):
    class Bar:  # the part of a tqdm bar the pipelines use
        total, n = 0, 0

        def update(self, k=1):
            self.n += k

        def refresh(self):
            pass

    bar = Bar()
    sd_pipe("a red circle", steps=4, seed=1, hires=Hires(scale=2, steps=10, denoise=0.5), progress=bar)
    assert bar.n == 4 + 10 and bar.total == 4 + 10  # "Hires steps: 10" runs 10, as in A1111


def test_hires_bad_input_is_one_line_before_loading(run_cli, tiny_sd, tmp_path, no_model_load):
    cases = [
        (["--hires-scale", 1000, "-W", 32, "-H", 32], "hires size 32000x32000 is too large"),
        (["--hires-scale", 0], "hires scale must be a number above 0"),
        (["--hires-scale", 2, "--hires-denoise", 0], "(0, 1]"),
        (["--hires-steps", 4], "need --hires-scale"),
        (["--hires-scale", 2, "--hires-width", 64], "not both"),
        (["--hires-width", 60], "not a multiple of 8"),
    ]
    for args, words in cases:
        code, out, err = run_cli("generate", "a", "--model", tiny_sd, *args, "--out", tmp_path / "o")
        assert code == 2 and out == "", (args, err)
        assert words in one_line(err), (args, err)
    assert not (tmp_path / "o").exists()


def test_hires_is_refused_on_img2img(tmp_path):
    from PIL import Image

    from t2i import jobs

    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    with pytest.raises(UsageError, match="hires fix is for text2image"):
        jobs.check(jobs.Request(["a"], task="image2image", init_image=tmp_path / "init.png", hires=Hires()))


def test_every_upscaler_runs(sd_pipe):
    for name in UPSCALERS:
        image = sd_pipe("a", steps=2, seed=1, progress=False, hires=Hires(scale=1.5, upscaler=name)).images[0]
        assert image.size == (48, 48), name


@pytest.mark.slow
def test_hires_on_the_bundled_model_reproduces(run_cli, tmp_path):
    """End to end on the real model: the CLI makes a 2x hires image that `t2i reproduce` makes again."""
    out = tmp_path / "h.png"
    code, _, err = run_cli("generate", "a red circle", "--steps", 6, "--seed", 3, "--hires-scale", 2,
                           "--hires-steps", 4, "--out", out, "-q")
    assert code == 0, err
    _, settings = metadata.read(out)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (2 * settings.width, 2 * settings.height)
    code, stdout, err = run_cli("reproduce", out, "-q")
    assert code == 0 and "bit for bit" in stdout, err
