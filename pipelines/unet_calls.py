"""How a t2i pipeline calls its UNet inside diffusers' loop: per-image exact batches and autoguidance.

Both wrap the UNet's forward for the length of one diffusers call, through the one hook
mechanism the speed options use too (t2i.speed.hooks, where ORDER fixes how they nest:
autoguidance outside per-image evaluation, both outside the feature cache, bf16 and compile).
"""

from __future__ import annotations

import contextlib

import torch

from t2i.settings import Settings
from t2i.speed.hooks import hooked


def per_image_unet(unet: torch.nn.Module, n_images: int):
    """Run the UNet one image at a time (its uncond and cond rows together) inside a batch, for the block.

    BLAS and conv kernels may pick another blocking for another batch size, which
    moves the last bits of a result. Evaluating each image's rows as a single run
    makes image i of a batch bit-identical to the single run with seed + i.
    """
    def split(forward):
        def split_forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
            rows = sample.shape[0]  # 2N with classifier-free guidance, else N
            per = rows // n_images
            if rows == n_images * per and n_images > 1:
                outs = []
                for i in range(n_images):
                    idx = torch.tensor([i + k * n_images for k in range(per)], device=sample.device)
                    t = timestep.index_select(0, idx) if torch.is_tensor(timestep) and timestep.ndim else timestep
                    extra = {k: v.index_select(0, idx) for k, v in (added_cond_kwargs or {}).items()}
                    out = forward(sample.index_select(0, idx), t, encoder_hidden_states.index_select(0, idx), *args,
                                  added_cond_kwargs=extra or added_cond_kwargs, **{**kwargs, "return_dict": False})[0]
                    outs.append(out)  # (per, C, h, w)
                merged = torch.empty_like(sample, dtype=outs[0].dtype)  # (rows, C, h, w)
                for i, out in enumerate(outs):
                    merged[i::n_images] = out  # row i + k*N <- out[k]
                return _unet_output(merged, kwargs.get("return_dict", True))
            # index_select above gives each image's rows in the default memory format; a single run's latents may
            # arrive channels-last (img2img's come from the VAE encoder), and conv kernels round differently for it
            return forward(sample.contiguous(), timestep, encoder_hidden_states, *args,
                           added_cond_kwargs=added_cond_kwargs, **kwargs)

        return split_forward

    return hooked(unet, "per_image", split)


@contextlib.contextmanager
def autoguided_unet(unet: torch.nn.Module, guide: torch.nn.Module, settings: Settings, n_images: int, exact: bool):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") in the late
    steps: below `settings.autoguidance_below` the prediction is cond + (s - 1) * (cond - guide(cond)), the
    model steered away from its weaker guide UNet on the same prompt, in place of classifier-free guidance's
    cond + (g - 1) * (cond - uncond); earlier steps keep classifier-free guidance.

    Why late: on the bundled model's prompts, classifier-free guidance in the late steps sharpens the shapes
    but also adds objects ("three" drawn as four); no guidance there leaves shapes malformed; autoguidance
    there keeps them sharp with fewer extra objects, while the early steps still need classifier-free
    guidance to place the objects the prompt asks for (docs/autoguidance.md).
    The diffusers pipeline still combines two rows with its guidance g, so the wrapper hands it, in the
    uncond row, the prediction that makes its sum the autoguided one. An autoguided step needs no
    unconditional prediction, so the UNet runs on the cond rows only and the guide on the same rows: the step
    costs what a classifier-free one does. (A speed option's feature cache sees the change of rows as a new
    run and starts over with a whole call.) With `exact`, the UNet and the guide both run one image at a time
    (per_image_unet), so a batch equals its single runs.
    """
    scale, below, g = settings.autoguidance, settings.autoguidance_below, settings.guidance

    def guided(forward):
        def guided_forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            rows, n = sample.shape[0], n_images
            if t >= below or rows != 2 * n:
                return forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                               **kwargs)
            # rows: uncond rows, then cond rows
            cond_x, cond_text = sample[n:], encoder_hidden_states[n:]  # (n, C, h, w), (n, L, E)
            step = timestep[n:] if torch.is_tensor(timestep) and timestep.ndim and len(timestep) == rows else timestep
            extra = {k: v[n:] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
            cond = forward(cond_x, step, cond_text, *args, added_cond_kwargs=extra,
                           **{**kwargs, "return_dict": False})[0]  # (n, C, h, w)
            with torch.no_grad():
                weak = guide(cond_x, step, cond_text, added_cond_kwargs=extra, return_dict=False)[0].to(cond.dtype)
            # the pipeline computes uncond + g * (cond - uncond); this uncond makes it cond + (s - 1) * (cond - weak)
            uncond = cond - (scale - 1) / (g - 1) * (cond - weak)
            merged = torch.cat([uncond, cond])  # (2n, C, h, w)
            return _unet_output(merged, kwargs.get("return_dict", True))

        return guided_forward

    with hooked(unet, "autoguidance", guided), per_image_unet(guide, n_images) if exact else contextlib.nullcontext():
        yield  # with `exact`, the guide too runs one image at a time


def _unet_output(sample: torch.Tensor, return_dict: bool):
    """`sample` as a UNet returns it: diffusers' output object, or a tuple with `return_dict=False`."""
    if not return_dict:
        return (sample,)
    # deferred: diffusers' model modules take seconds to import and load with a model, not with t2i.pipelines
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)
