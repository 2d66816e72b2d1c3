"""Diffusers folder -> original (CompVis/LDM, A1111) single-file checkpoint, for tests.

The inverse of diffusers' single-file conversion (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint` in diffusers/loaders/single_file_utils.py), so a
tiny random model can be written as `model.safetensors` and loaded back with
`from_single_file(path, config=folder)`. Every tensor must find a name:
an unmapped key raises, so a round trip that loads proves the mapping whole.

LDM numbers the UNet's blocks by position (`input_blocks.N`, `output_blocks.N`),
so the numbering is derived from the folder's unet config, not SD 1.5's 12 blocks.
SD 1.x/2.x UNets and VAEs and both SDXL text encoders are covered.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
            "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


# --------------------------------------------------------------------------- UNet


def _unet_prefixes(config: dict) -> dict[str, tuple[str, dict]]:
    """diffusers module prefix -> (LDM prefix, renames inside it), in LDM's positional numbering."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block has no LDM layout (diffusers' converter assumes an int)")
    n = len(config["down_block_types"])
    out = {d: (l, {}) for d, l in UNET_TOP.items()}
    index = 1  # input_blocks.0 is conv_in
    for i in range(n):
        for j in range(layers):
            out[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{index}.0.", RESNET)
            out[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if i < n - 1:  # every block but the last ends in a downsampler, a block of its own
            out[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1
    out["mid_block.resnets.0."] = ("middle_block.0.", RESNET)
    out["mid_block.attentions.0."] = ("middle_block.1.", {})
    out["mid_block.resnets.1."] = ("middle_block.2.", RESNET)
    has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    for i in range(n):
        for j in range(layers + 1):  # up blocks have one more layer: the skip from conv_in / the downsampler
            index = i * (layers + 1) + j
            out[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{index}.0.", RESNET)
            out[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{index}.1.", {})
        if i < n - 1:  # the upsampler sits after the last layer's resnet (and attention, if any)
            slot = 2 if has_attention[i] else 1
            out[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{index}.{slot}.conv.", {})
    return out


def _rename(key: str, prefixes: dict[str, tuple[str, dict]]) -> str:
    match = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if match is None:
        raise KeyError(f"no LDM name for {key!r}")
    new, renames = prefixes[match]
    rest = key[len(match):]
    for old, ldm in renames.items():
        if rest.startswith(old + "."):
            rest = ldm + rest[len(old):]
            break
    return new + rest


def unet_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict in LDM names (without the `model.diffusion_model.` prefix)."""
    prefixes = _unet_prefixes(config)
    return {_rename(k, prefixes): v for k, v in state.items()}


# --------------------------------------------------------------------------- VAE


def _vae_prefixes(config: dict) -> dict[str, tuple[str, dict]]:
    n = len(config["down_block_types"])
    shortcut = {"conv_shortcut": "nin_shortcut"}
    out = {p: (p, {}) for p in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                "quant_conv.", "post_quant_conv.")}
    for part in ("encoder", "decoder"):
        out[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        out[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", shortcut)
        out[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", shortcut)
        out[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
    for i in range(n):
        out[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", {})
        out[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
        out[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{n - 1 - i}.block.", {})  # LDM counts up blocks upward
        out[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{n - 1 - i}.upsample.conv.", {})
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in LDM names (without the `first_stage_model.` prefix)."""
    prefixes = _vae_prefixes(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, prefixes).replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs: (C, C) -> (C, C, 1, 1)
        out[new] = value
    return out


# --------------------------------------------------------------------------- text encoders


def clip_to_ldm(state: dict) -> dict:
    """A transformers CLIPTextModel state dict as LDM's FrozenCLIPEmbedder keeps it (under `transformer.`)."""
    # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; LDM files always have it.
    return {"transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(state: dict) -> dict:
    """A CLIPTextModelWithProjection state dict in OpenCLIP names (SDXL's `conditioner.embedders.1.model.`)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),  # OpenCLIP multiplies x @ P
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):  # OpenCLIP's nn.MultiheadAttention keeps q, k, v in one matrix
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)  # (3 * D, D) or (3 * D,)
        for key in [k for k in state if k.startswith(src)]:
            rest = key[len(src):]
            for old, new in OPEN_CLIP_LAYER.items():
                if rest.startswith(old + "."):
                    out[dst + new + rest[len(old):]] = state.pop(key)
                    break
    state.pop("embeddings.position_ids", None)  # a buffer older transformers saved
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return out


# --------------------------------------------------------------------------- whole checkpoints


def _component(folder: Path, name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    (weights,) = (folder / name).glob("*.safetensors")
    return load_file(str(weights)), json.loads((folder / name / "config.json").read_text())


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def to_ldm_state_dict(diffusers_folder: str | Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder(s) of an SD 1.x/2-CLIP-L or SDXL diffusers folder, in LDM single-file names."""
    folder = Path(diffusers_folder)
    index = json.loads((folder / "model_index.json").read_text())
    unet, unet_config = _component(folder, "unet")
    vae, vae_config = _component(folder, "vae")
    text, _ = _component(folder, "text_encoder")
    state = _prefixed("model.diffusion_model.", unet_to_ldm(unet, unet_config))
    state |= _prefixed("first_stage_model.", vae_to_ldm(vae, vae_config))
    if "text_encoder_2" in index:
        text_2, _ = _component(folder, "text_encoder_2")
        state |= _prefixed("conditioner.embedders.0.", clip_to_ldm(text))
        state |= _prefixed("conditioner.embedders.1.model.", open_clip_to_ldm(text_2))
    else:
        state |= _prefixed("cond_stage_model.", clip_to_ldm(text))
    return state


def save_ldm_checkpoint(diffusers_folder: str | Path, path: str | Path) -> Path:
    """Write the folder as one LDM checkpoint: safetensors, or for any other suffix torch.save like a .ckpt."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in to_ldm_state_dict(diffusers_folder).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # original .ckpt files nest the weights under "state_dict"
    return path
