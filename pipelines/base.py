"""What every t2i pipeline shares: loaded components, defaults, LoRAs, noise, decoding.

A t2i pipeline wraps one diffusers pipeline (`self.pipe`) and adds what
diffusers lacks: prompt syntax and long prompts, CPU-drawn per-image noise (a
seed means the same image on every device, and a batch equals its single
runs), the NaN guard, LoRA bookkeeping and the exact `Settings` of each image.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import diffusers
import torch
import transformers
from PIL import Image

from t2i import __version__, guards, prompts
from t2i import models
from t2i.embeddings import EmbeddingSet, model_folder_dir
from t2i.models.guide import GUIDE_FOLDER, load_guide
from t2i.devices import dtype_name, resolve_device, resolve_dtype
from t2i.errors import NumericalError, UsageError
from t2i.lora.apply import LoraSet
from t2i.output import save_images
from t2i.pipelines.unet_calls import autoguided_unet, per_image_unet
from t2i.progress import StepBar
from t2i.samplers import DEFAULT_SAMPLER, get_sampler, make_scheduler, resolve
from t2i.settings import EmbeddingSpec, LoraSpec, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    source: models.ModelSource
    arch: str  # sd1 | sd2 | sdxl
    path: Path  # local folder or file the weights came from
    hash: str  # A1111-style short model hash
    model_config: str = ""  # diffusers folder that configured a single-file checkpoint


@dataclass
class Result:
    """The images of one call and, for each, the exact settings that make it again."""

    images: list[Image.Image]
    settings: list[Settings]

    def __iter__(self):
        return iter(zip(self.images, self.settings))

    def save(self, out: str | Path, overwrite: bool = False) -> list[Path]:
        """Write PNGs with metadata: into a folder (numbered names) or to a .png path."""
        return save_images(self.images, self.settings, out, overwrite=overwrite)


def versions() -> dict[str, str]:
    return {"t2i": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


@dataclass
class Defaults:
    steps: int = 20
    guidance: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    # Autoguidance (a model folder with a guide/ UNet): its scale, and the timestep below which it replaces
    # classifier-free guidance (see autoguided_unet).
    autoguidance: float = 0.0
    autoguidance_below: int = 500


class BasePipeline:
    """Loading, device moves, defaults and the shared steps of generation."""

    task = "text2image"
    diffusers_classes: dict[str, str] = {}  # arch -> diffusers pipeline class for this task (None: as loaded)

    def __init__(self, pipe, model: LoadedModel, loras: LoraSet | None = None, guide=None):
        self.pipe = pipe
        self.model = model
        self.loras = loras or LoraSet(pipe)
        self._scheduler_config = dict(pipe.scheduler.config)
        self.defaults = self._read_defaults()
        # The model's guide UNet (its folder's guide/) and how autoguidance uses it, from the model's t2i.json.
        self.guide = guide
        self.autoguidance = self.defaults.autoguidance if guide is not None else 0.0
        self.autoguidance_below = self.defaults.autoguidance_below
        # Image i of a batch equals the single run with seed + i, bit for bit (see per_image_unet).
        # False batches the UNet across images: faster, equal only to within float rounding.
        self.exact_batch = True
        self.speed: str = "auto"  # the speed mode of its calls: "auto", "exact" or option names (t2i.speed.per_call)
        self.speed_on: list[str] | None = None  # names of the t2i.speed options on now (set by speed.apply), recorded
        self.on_step: Callable[[int], None] | None = None  # called after every denoising step (benchmarks, UIs)
        self.decoder = None  # a small VAE decoding in place of pipe.vae (speed option tiny_vae), or None
        pipe.set_progress_bar_config(disable=True)  # t2i draws one bar across a whole job
        # A1111's everyday set: clip skip (see the clip_skip property) and a VAE in place of the model's own
        self._clip_skip = 1
        self._own_vae = pipe.vae  # what set_vae(None) puts back
        self.vae_path: Path | None = None  # the VAE decoding now, when not the model's own
        self.vae_hash = ""
        # Textual-inversion embeddings a prompt calls by name: the model folder's embeddings/ by default
        self.embeddings = EmbeddingSet([d] if (d := model_folder_dir(model.path)) else [])

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        allow_pickle: bool = False,
        model_config: str | None = None,
    ):
        """Load a model: None (the bundled demo model), a diffusers folder, a single file or a hub id."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        source = models.resolve(model)
        pipe, arch, path = models.load(source, dt, allow_pickle=allow_pickle, model_config=model_config)
        pipe = cls._convert(pipe, arch)
        pipe.to(dev)
        folder = Path(path) if Path(path).is_dir() else None
        loaded = LoadedModel(source, arch, Path(path), models.model_hash(source, folder), model_config or "")
        guide = load_guide(folder, dt, dev, pipe.unet.config)
        return cls(pipe, loaded, guide=guide)

    @classmethod
    def from_pipe(cls, other: "BasePipeline"):
        """The same loaded components (no reload, no copy) behind another task's pipeline."""
        pipe = cls._convert(other.pipe, other.model.arch)
        new = cls(pipe, other.model, other.loras.rebind(pipe), guide=other.guide)
        new.embeddings = other.embeddings
        new.autoguidance, new.autoguidance_below = other.autoguidance, other.autoguidance_below
        new.speed = other.speed
        new._clip_skip, new._own_vae, new.vae_path, new.vae_hash = \
            other._clip_skip, other._own_vae, other.vae_path, other.vae_hash
        return new

    @classmethod
    def _convert(cls, pipe, arch: str):
        wanted = cls.diffusers_classes.get(arch)
        if wanted is None or type(pipe).__name__ == wanted:
            return pipe
        target = getattr(diffusers, wanted)
        modules, options = target._get_signature_keys(target)
        kwargs = {k: v for k, v in pipe.components.items() if k in modules}
        kwargs |= {k: pipe.config[k] for k in options if k in pipe.config and k not in kwargs}  # e.g. force_zeros_...
        new = target(**kwargs)
        if hasattr(new, "register_to_config") and "requires_safety_checker" in new.config:
            new.register_to_config(requires_safety_checker=False)
        return new

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        """Move the components to another device and/or dtype; returns self."""
        dev = resolve_device(str(device)) if device is not None else self.device
        dt = resolve_dtype(dtype, dev) if dtype is not None else self.dtype
        self.pipe.to(dev, dt)
        for extra in (self.decoder, self.guide, self._own_vae if self.vae_path is not None else None):
            if extra is not None:
                extra.to(dev, dt)
        return self

    @property
    def autoguidance(self) -> float:
        """The autoguidance scale (0 = off, classifier-free guidance throughout; see autoguided_unet)."""
        return self._autoguidance_scale

    @autoguidance.setter
    def autoguidance(self, scale: float) -> None:
        scale = float(scale or 0.0)
        guards.check_autoguidance(scale)
        if scale and self.guide is None:
            raise UsageError(f"the model {self.model.source.name or self.model.path} has no {GUIDE_FOLDER}/ "
                             "UNet, which autoguidance needs; leave autoguidance at 0 (--autoguidance 0, or out)")
        self._autoguidance_scale = scale

    @property
    def clip_skip(self) -> int:
        """A1111's clip skip: 1 = the text encoder's last layer, N = its N-th layer from the end through the final
        layer norm. SD 1.x only: SD 2.x and SDXL encode as they always do (A1111 ignores it there too)."""
        return self._clip_skip

    @clip_skip.setter
    def clip_skip(self, n: int) -> None:
        self._clip_skip = guards.check_clip_skip(n, self.pipe.text_encoder.config.num_hidden_layers)

    def set_vae(self, vae: str | Path | None, vae_dir: str | Path | None = None, allow_pickle: bool = False):
        """Decode (and encode) with another VAE: a diffusers VAE folder, a weights file (original or diffusers
        layout; pickles only with allow_pickle), or a name in `vae_dir`; None or "" puts the model's own back.
        Returns self."""
        from t2i.models import vae as vaes  # deferred: only a VAE override needs diffusers' converter

        if not vae:
            self.pipe.register_modules(vae=self._own_vae)
            self.vae_path, self.vae_hash = None, ""
            return self
        path = vaes.resolve_vae(vae, vae_dir, allow_pickle).resolve()  # recorded: replayable from anywhere
        if path != self.vae_path:
            new = vaes.load_vae(path, self._own_vae, self.dtype, self.device, allow_pickle)
            self.pipe.register_modules(vae=new)
            self.vae_path, self.vae_hash = path, vaes.vae_hash(path)
        return self

    def _everyday_settings(self) -> dict:
        """The Settings fields of clip skip and the VAE override."""
        vae = {"vae": str(self.vae_path), "vae_name": self.vae_path.name, "vae_hash": self.vae_hash} \
            if self.vae_path is not None else {}
        return {"clip_skip": self._clip_skip, **vae}

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def _read_defaults(self) -> Defaults:
        size = self.pipe.unet.config.sample_size * self.vae_scale_factor
        d = Defaults(width=size, height=size)
        extra = self.model.path / "t2i.json" if self.model.path.is_dir() else None
        if extra is not None and extra.is_file():
            try:
                data = json.loads(extra.read_text())
                known = {k: v for k, v in data.items() if k in Defaults.__dataclass_fields__}
                d = replace(d, **known)
            except (json.JSONDecodeError, TypeError):
                pass  # model-recommended defaults are a courtesy, not a requirement
        return d

    # ------------------------------------------------------------------ shared steps

    def _settings(
        self, prompt, negative_prompt, steps, guidance, sampler, seed, width, height, batch, loras, **extra
    ) -> list[Settings]:
        """Check inputs (cheap, before any compute) and fill defaults: one Settings per image."""
        d = self.defaults
        if not isinstance(prompt, str):
            raise UsageError("prompt must be a string (use a loop or a prompts file for several)")
        steps = d.steps if steps is None else int(steps)
        guidance = d.guidance if guidance is None else float(guidance)
        width = d.width if width is None else int(width)
        height = d.height if height is None else int(height)
        negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
        # the sampler and schedule that run, split and resolved ("automatic" -> A1111's choice): what is recorded
        schedule = extra.pop("scheduler", None)
        if not sampler and schedule not in (None, "", "automatic"):
            sampler = get_sampler(d.sampler).name  # the model's default sampler, on the schedule asked for
        sampler, schedule = resolve(sampler or d.sampler, schedule, self._scheduler_config)
        guards.check_steps(steps)
        guards.check_guidance(guidance)
        guards.check_size(width, height, self.vae_scale_factor)
        guards.check_batch(batch)
        if seed is None or seed == -1:
            seed = random.randrange(2**32)
        guards.check_seed(seed)
        if seed + batch - 1 > guards.MAX_SEED:
            raise UsageError(f"seed {seed} + batch {batch} runs past 2**64-1; use a smaller seed")
        guards.check_memory(self.memory_estimate(batch, width, height), self.device,
                            "use a smaller batch or size" + ("" if self.exact_batch else ", or exact_batch=True"))
        specs = [self.loras.spec(l) for l in loras]
        autoguidance = self._autoguidance(prompt, specs, guidance)
        if autoguidance:
            extra |= {"autoguidance": autoguidance, "autoguidance_below": int(self.autoguidance_below)}
        extra |= self._embedding_specs(prompt, negative_prompt)
        base = Settings(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, guidance=guidance,
            seed=seed, width=width, height=height, model=self.model.source.asked, model_name=self.model.source.name,
            model_hash=self.model.hash, model_config=self.model.model_config, arch=self.model.arch, loras=specs, device=str(self.device),
            dtype=dtype_name(self.dtype), pipeline=self.task, speed=self.speed_names(), versions=versions(),
            scheduler=schedule, **self._everyday_settings(), **extra,
        )
        return [replace(base, seed=seed + i, batch_index=i, batch_size=batch) for i in range(batch)]

    def _autoguidance(self, prompt: str, loras: list[LoraSpec], guidance: float) -> float:
        """The autoguidance scale this call runs with (0: plain classifier-free guidance).

        Off without classifier-free guidance (guidance <= 1: there is no second row to steer with) and with a
        LoRA at a non-zero scale: the guide does not carry it, so steering away from it would multiply its effect.
        """
        scales = [lo.scale for lo in loras] + [scale for _, scale in prompts.extract_loras(prompt)[1]]
        if not self.autoguidance or guidance <= 1 or any(scales):
            return 0.0
        return self.autoguidance

    def speed_names(self) -> list[str]:
        """The speed options this pipeline runs with now, as `t2i.speed.SpeedOptions.parse` reads them back."""
        names = [n for n in self.speed_on or [] if n != "sdpa"]  # SDPA is how diffusers loads attention anyway
        return names if self.exact_batch or "batched" in names else ["batched", *names]

    def memory_estimate(self, batch: int, width: int, height: int) -> int:
        """Bytes one call needs beyond the loaded weights, from the sizes alone; it errs low (attention maps
        are not counted: SDPA need not hold them), so a job it refuses could not have run."""
        f, size = self.vae_scale_factor, torch.finfo(self.dtype).bits // 8
        h, w = height // f, width // f
        rows = 2 * (1 if self.exact_batch else batch)  # cond + uncond rows in one UNet call
        unet = sum(c * (h >> i) * (w >> i) for i, c in enumerate(self.pipe.unet.config.block_out_channels))
        unet *= 8 * rows * size  # a few feature maps alive per level, plus the skip connections
        vae = 8 * self.pipe.vae.config.block_out_channels[0] * height * width * 4  # one image decoded at a time
        kept = batch * (2 * 3 * height * width * 4 + 3 * height * width)  # decoded float tensors, then 8-bit images
        return unet + vae + kept

    def _prepare_loras(self, prompt: str, loras: list[LoraSpec]) -> str:
        """Activate the LoRAs given as arguments plus `<lora:NAME:S>` tags; return the prompt without tags."""
        clean, tagged = prompts.extract_loras(prompt)
        self.loras.activate(loras, tagged)
        return clean

    def _text_encoders(self) -> tuple[list, list]:
        """(tokenizers, text encoders): one for SD 1.x/2.x, two for SDXL."""
        p = self.pipe
        if self.model.arch == "sdxl":
            return [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2]
        return [p.tokenizer], [p.text_encoder]

    def _embedding_tables(self, *texts: str) -> list[dict]:
        """For each tokenizer, the lookup of the textual-inversion embeddings these texts may call (see
        t2i.embeddings); empty tables (no file is read) when there are none."""
        texts = tuple(prompts.extract_loras(t)[0] for t in texts if t)  # a <lora:NAME:..> tag calls no embedding
        return [self.embeddings.lookup(tok, list(texts)) for tok in self._text_encoders()[0]]

    def _embedding_specs(self, prompt: str, negative: str) -> dict:
        """{"embeddings": [EmbeddingSpec]} of the embeddings the prompt and negative prompt call, their vectors
        checked against this model's text encoders (a one-line UsageError naming the file); {} for none."""
        toks, encs = self._text_encoders()
        tables = self._embedding_tables(prompt, negative)
        used: dict[str, EmbeddingSpec] = {}
        for text in (prompt, negative):
            chunks = prompts.tokenize(toks[0], prompts.extract_loras(text or "")[0], tables[0])
            for emb in prompts.used_embeddings(chunks):
                for k, enc in enumerate(encs):
                    emb.for_encoder(k, len(encs), enc.get_input_embeddings().embedding_dim)
                used.setdefault(emb.name, EmbeddingSpec(emb.name, emb.hash, str(emb.path)))
        return {"embeddings": list(used.values())} if used else {}

    def _encode(self, prompt: str, negative: str, guidance: float) -> dict:
        """Prompt embeddings for the diffusers call (chunked, weighted), cond and uncond alike."""
        p = self.pipe
        tables = self._embedding_tables(prompt, negative)
        if self.model.arch == "sdxl":
            toks, encs = [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2]
            cond = prompts.encode_sdxl(toks, encs, prompt, embeddings=tables)
            zero = not negative and p.config.get("force_zeros_for_empty_prompt", True)
            uncond = prompts.encode_sdxl(toks, encs, negative, zero=zero, embeddings=tables)
            empty = prompts.encode_sdxl(toks, encs, "", zero=zero)
        else:
            skip = self._clip_skip if self.model.arch == "sd1" else 1  # SD 2.x ignores it, as in A1111
            cond = prompts.encode_sd(p.tokenizer, p.text_encoder, prompt, skip, embeddings=tables[0])
            uncond = prompts.encode_sd(p.tokenizer, p.text_encoder, negative, skip, embeddings=tables[0])
            empty = prompts.encode_sd(p.tokenizer, p.text_encoder, "", skip)
        cond, uncond = prompts.pad_to_same_length(cond, uncond, empty)
        kwargs = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds}
        if self.model.arch == "sdxl":
            kwargs |= {"pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": uncond.pooled}
        return kwargs

    def _generate(self, settings: list[Settings], progress, task_inputs: Callable, finish: Callable | None = None,
                  decode: Callable | None = None) -> Result:
        """The path every task shares: LoRAs, sampler, prompt embeddings, then the diffusers call per group.

        `task_inputs(group)` gives the task's own arguments of the diffusers call (initial
        latents, init image, mask, strength, per-image generators); `finish(group, images)`
        may post-process the decoded images (inpainting pastes the unmasked original back); `decode(latents)`
        replaces the VAE decode (hires fix keeps the latents).
        """
        s0 = settings[0]
        text = self._prepare_loras(s0.prompt, s0.loras)
        sampler_info = get_sampler(s0.sampler)
        embeds = self._encode(text, s0.negative_prompt, s0.guidance)
        # A batch-coupled sampler draws its step noise for the whole batch at once: one image per call
        groups = [[s] for s in settings] if sampler_info.batch_coupled else [settings]
        bar = self._progress(progress, len(groups))
        images = []
        try:
            for group in groups:
                n = len(group)
                self.pipe.scheduler = make_scheduler(group[0].sampler, self._scheduler_config, seed=group[0].seed,
                                                     schedule=group[0].scheduler)
                batched = {k: v.expand(n, *v.shape[1:]) for k, v in embeds.items()}
                with (per_image_unet(self.pipe.unet, n) if self.exact_batch else contextlib.nullcontext(),
                      autoguided_unet(self.pipe.unet, self.guide, s0, n, self.exact_batch)
                      if s0.autoguidance else contextlib.nullcontext()):
                    out = self.pipe(**batched, **task_inputs(group), num_inference_steps=s0.steps,
                                    guidance_scale=s0.guidance, output_type="latent",
                                    callback_on_step_end=self._step_callback(bar))
                decoded = (decode or self._decode)(out.images)
                images += finish(group, decoded) if finish else decoded
        finally:
            if bar is not None and progress is True:
                bar.close()
        return Result(images, settings)

    @staticmethod
    def _generators(settings: list[Settings]) -> list[torch.Generator]:
        """One CPU generator per image, seeded with its own seed: noise drawn on the CPU, the same on any device."""
        return [torch.Generator("cpu").manual_seed(s.seed) for s in settings]

    def _latent_shape(self, s: Settings) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (1, self.pipe.unet.config.in_channels, s.height // f, s.width // f)

    def _noise(self, settings: list[Settings]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial latents drawn on the CPU, one generator per image seeded with its own seed.

        The same generators then feed the sampler's per-step noise, so image i of a
        batch is exactly the single run with seed + i, on any device.
        """
        gens = self._generators(settings)
        noise = [torch.randn(self._latent_shape(s), generator=g, dtype=torch.float32) for s, g in zip(settings, gens)]
        return torch.cat(noise).to(self.device, self.dtype), gens  # (B, C, h, w)

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> PIL images through the NaN guard (fp32 retry on overflow)."""
        vae = self.decoder if self.decoder is not None else self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents / vae.config.scaling_factor + shift  # (B, C, h, w)
        # One image at a time: the decoder's kernels then see the same shapes as in a single run.
        images = torch.cat([guards.decode_latents(vae, latents[i : i + 1]) for i in range(len(latents))])
        return self.pipe.image_processor.postprocess(images, output_type="pil")

    def _progress(self, progress, total_calls: int):
        """A tqdm bar on stderr over all denoising steps of a call, or None."""
        if progress is False or progress is None:
            return None
        if progress is not True:
            return progress  # the caller's own bar (the CLI shares one across a job)
        return StepBar(self.task, leave=False)

    def _step_callback(self, bar) -> Callable:
        """After each step: stop at the first NaN/inf in the latents (not after all steps), advance the bar."""
        state = {"grown": False}

        def on_step_end(pipe, i, t, kwargs):
            latents = kwargs.get("latents")
            if latents is not None and not guards.is_finite(latents):
                raise NumericalError(
                    f"the UNet produced NaN/inf at step {i + 1} of {pipe.num_timesteps} in {dtype_name(self.dtype)}"
                    + ("; rerun with --dtype fp32" if self.dtype != torch.float32 else
                       "; the model's weights may be broken (try another sampler or a lower guidance)"))
            if self.on_step is not None:
                self.on_step(i)
            if bar is not None:
                if not state["grown"]:
                    bar.total = (bar.total or 0) + pipe.num_timesteps
                    state["grown"] = True
                    bar.refresh()
                bar.update(1)
            return kwargs

        return on_step_end
