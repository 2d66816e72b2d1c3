"""LoRA files: the two key layouts, reading, writing and converting between them.

Two layouts are in use:

- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also
  `text_encoder.` and `text_encoder_2.`); the scale alpha/rank is 1 unless a
  `lora_adapter_metadata` header says otherwise. `pipe.load_lora_weights` reads it.
- kohya/A1111: `lora_unet_<module, dots as underscores>.lora_down.weight` /
  `.lora_up.weight` / `.alpha` (text encoders `lora_te_`, SDXL `lora_te1_` and
  `lora_te2_`), scale alpha/rank per module. SDXL files made by kohya's scripts
  name UNet modules the sgm way (`input_blocks_4_1_...`). LoCon (kohya's conv_dim,
  LyCORIS' locon) adds the ResNet convolutions in the same keys, lora_down a
  (rank, in, kh, kw) convolution; LyCORIS' CP form adds a `.lora_mid.weight`,
  folded into lora_down on reading.

t2i writes alpha/rank into lora_B (lora_up) and alpha = rank, so a file means the
same to every loader, and a diffusers -> kohya -> diffusers round trip is bit for bit.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import safetensors.torch  # save_file through the module: tests replace it with a full disk
import torch
from safetensors import SafetensorError, safe_open

from t2i.errors import ModelLoadError, NumericalError, UsageError
from t2i.files import atomic_write, check_weight_file, load_pickled_weights

FORMATS = ("diffusers", "kohya")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' per-component LoraConfig (alpha, patterns)

_DIFFUSERS_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te[12]?)_(.+?)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)$")
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}

# Module names with an underscore in diffusers' UNet and transformers' CLIP text models; a
# kohya name (dots turned into underscores) is read back by joining these first.
_COMPOUND_NAMES = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj", "cond_proj", "add_q_proj",
    "add_k_proj", "add_v_proj", "to_add_out", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "text_projection", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
)
_COMPOUNDS = sorted((tuple(n.split("_")) for n in _COMPOUND_NAMES), key=len, reverse=True)


# --------------------------------------------------------------------------- reading


def read_lora(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a LoRA file, as stored (either layout); NaN/inf weights are refused."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"LoRA file {path} does not exist")
    check_weight_file(path, allow_pickle)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    else:  # only reached when pickles were explicitly allowed
        sd = load_pickled_weights(path)
        sd = sd.get("state_dict", sd)
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"LoRA {path} holds no tensors; is it a LoRA file?")
    bad = [k for k, v in sd.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelLoadError(f"LoRA {path} contains NaN/inf weights ({len(bad)} tensors, e.g. {bad[0]}); refused")
    return sd, metadata


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """'diffusers' or 'kohya', from the keys; anything else is a ModelLoadError naming what was found."""
    keys = list(state_dict)
    if keys and all(_DIFFUSERS_KEY.match(k) for k in keys):
        return "diffusers"
    if keys and all(_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    odd = [k for k in keys if not (_DIFFUSERS_KEY.match(k) or _KOHYA_KEY.match(k))] or keys
    raise ModelLoadError(
        f"unknown LoRA layout: {len(keys)} tensors, e.g. {', '.join(repr(k) for k in odd[:2])}; t2i reads the "
        "diffusers layout (...lora_A.weight/lora_B.weight) and kohya's (lora_unet_....lora_down.weight/lora_up.weight)"
    )


def lora_modules(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *, names: Iterable[str] = (),
    layers_per_block: int = 2,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """'unet.<module>' -> (lora_A, lora_B, alpha) as stored, from either layout.

    `names` (the model's module names, 'unet.down_blocks.0....to_q') makes reading kohya's
    underscored names exact for modules this file does not know, and picks the model's
    spelling of text encoder modules; `layers_per_block` is the UNet's, for sgm-named files.
    """
    names = set(names)
    if detect_layout(state_dict) == "diffusers":
        sd = _with_component_prefix(state_dict)
        alphas = _diffusers_alphas(sd, metadata)
        found = {m: (sd[f"{m}.lora_A.weight"], sd.get(f"{m}.lora_B.weight"), a) for m, a in alphas.items()}
        lonely = [k for k in sd if k.endswith(".lora_B.weight") and k[: -len(".lora_B.weight")] not in found]
    else:
        known: dict[str, list[str]] = {}
        for n in names:
            component, _, path = n.partition(".")
            known.setdefault(f"{component}:{path.replace('.', '_')}", []).append(n)
        found = {}
        for key, down in state_dict.items():
            prefix, path, part = _KOHYA_KEY.match(key).groups()
            if part == "lora_down.weight":
                alpha = state_dict.get(f"{prefix}_{path}.alpha")
                mid = state_dict.get(f"{prefix}_{path}.lora_mid.weight")
                if mid is not None:
                    down = _fold_mid(down, mid, key)
                module = _kohya_module(_KOHYA_COMPONENT[prefix], path, known, layers_per_block)
                found[module] = (down, state_dict.get(f"{prefix}_{path}.lora_up.weight"),
                                 down.shape[0] if alpha is None else float(alpha))  # kohya: no alpha = rank
        lonely = [k for k in state_dict if k.endswith(".lora_up.weight")
                  and k.replace(".lora_up.", ".lora_down.") not in state_dict]
    missing = [m for m, (_, b, _) in found.items() if b is None]
    if missing or lonely:
        raise ModelLoadError(f"LoRA module {(missing or lonely)[0]} has only one of its two weights; "
                             "the file is incomplete")
    return {_as_in_model(_canonical(m), names): v for m, v in found.items()}


# --------------------------------------------------------------------------- converting


def to_kohya(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """diffusers layout -> kohya's (a kohya dict comes back as it is).

    The tensors are not changed: each module's `.alpha` is the alpha the diffusers file
    means (its rank, unless diffusers' `lora_adapter_metadata` in `metadata` says otherwise).
    """
    if detect_layout(state_dict) == "kohya":
        return dict(state_dict)
    modules = lora_modules(state_dict, metadata)
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
    if any(m.startswith("text_encoder_2.") for m in modules):
        prefix["text_encoder"] = "lora_te1"  # SDXL: kohya numbers both encoders
    out = {}
    for module, (a, b, alpha) in modules.items():
        component, _, path = module.partition(".")
        name = f"{prefix[component]}_{path.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = a
        out[f"{name}.lora_up.weight"] = b
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def to_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                 names: Iterable[str] = (), layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """Either layout -> diffusers', alpha/rank folded into lora_B, so the file means the same to any loader.

    Where alpha equals the rank (t2i's own files) the tensors are unchanged: the round trip
    diffusers -> kohya -> diffusers is bit for bit. Text encoder modules are spelled
    `text_model.encoder...` (kohya's and transformers 4's spelling) unless `names` shows the
    model spells them otherwise. `names` and `layers_per_block`: see `lora_modules`.
    """
    out = {}
    modules = lora_modules(state_dict, metadata, names=names, layers_per_block=layers_per_block)
    for module, (a, b, alpha) in modules.items():
        out[f"{module}.lora_A.weight"] = a
        out[f"{module}.lora_B.weight"] = _fold(b, alpha, a.shape[0])
    return out


def _fold_mid(down: torch.Tensor, mid: torch.Tensor, key: str) -> torch.Tensor:
    """LyCORIS LoCon's CP/Tucker form, up(mid(down(x))) with a 1x1 down, as a plain LoRA: down' = mid . down.

    The 1x1 down only mixes channels, so the composition is one (rank, in, kh, kw) convolution: exact.
    """
    if down.dim() != 4 or down.shape[2:] != (1, 1) or mid.dim() != 4 or mid.shape[1] != down.shape[0]:
        raise ModelLoadError(f"LoRA {key}: lora_mid {tuple(mid.shape)} does not fit lora_down {tuple(down.shape)}")
    folded = torch.einsum("orhw,ri->oihw", mid.float(), down[:, :, 0, 0].float())  # (rank, in, kh, kw)
    return folded.to(down.dtype)


def _fold(up: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """lora_B scaled by alpha/rank (computed in float32); untouched when the scale is 1."""
    if float(alpha) == float(rank):
        return up
    return (up.float() * (float(alpha) / rank)).to(up.dtype)


def _with_component_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys without a component (`down_blocks....lora_A.weight`) are the UNet's, as diffusers reads them."""
    prefixed = [k.split(".", 1)[0] in COMPONENTS for k in sd]
    if all(prefixed):
        return dict(sd)
    if not any(prefixed):
        return {f"unet.{k}": v for k, v in sd.items()}
    raise ModelLoadError("LoRA mixes keys with and without a component prefix (unet./text_encoder.); "
                         f"e.g. {next(k for k, p in zip(sd, prefixed) if not p)!r}")


def _diffusers_alphas(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, float]:
    """Module -> the alpha a diffusers-layout file means: its rank, unless diffusers' adapter metadata says so.

    peft's scale is alpha / rank, or alpha / sqrt(rank) with rsLoRA; the alpha returned
    here is the one that gives that scale by the plain alpha / rank rule.
    """
    config = json.loads((metadata or {}).get(ADAPTER_METADATA_KEY) or "{}")
    alphas = {}
    for key, value in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        component, _, path = module.partition(".")
        rank = value.shape[0]
        alpha = float(rank)
        if f"{component}.lora_alpha" in config:
            alpha = float(config[f"{component}.lora_alpha"])
            for pattern, a in (config.get(f"{component}.alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pattern})$", path):
                    alpha = float(a)
                    break
            if config.get(f"{component}.use_rslora"):
                alpha = alpha * rank**0.5
        alphas[module] = alpha
    return alphas


def _canonical(module: str) -> str:
    """transformers 5's CLIPTextModel dropped the `text_model.` level; files (and kohya) keep it."""
    component, _, path = module.partition(".")
    if component != "unet" and path.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return f"{component}.text_model.{path}"
    return module


def _as_in_model(module: str, names: set[str]) -> str:
    """The model's spelling of a text encoder module, with or without `text_model.`."""
    if not names or module in names:
        return module
    component, _, path = module.partition(".")
    other = path.removeprefix("text_model.") if path.startswith("text_model.") else f"text_model.{path}"
    return f"{component}.{other}" if f"{component}.{other}" in names else module


def _kohya_module(component: str, path: str, known: dict[str, list[str]], layers_per_block: int) -> str:
    """'down_blocks_0_attentions_0_proj_in' -> 'unet.down_blocks.0.attentions.0.proj_in'."""
    if component == "unet" and re.match(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_", path):
        path = _sgm_to_diffusers(path, layers_per_block)
    exact = known.get(f"{component}:{path}", ())
    if len(exact) == 1:
        return exact[0]
    tokens, parts, i = path.split("_"), [], 0
    while i < len(tokens):
        n = next((len(c) for c in _COMPOUNDS if tuple(tokens[i:i + len(c)]) == c), 1)
        parts.append("_".join(tokens[i:i + n]))
        i += n
    return f"{component}.{'.'.join(parts)}"


_SGM_LEAVES = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut", "op": "conv"}
_SGM_TOP = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
            "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
            "input_blocks_0_0": "conv_in", "out_2": "conv_out"}


def _sgm_to_diffusers(path: str, layers_per_block: int) -> str:
    """kohya's SDXL names ('input_blocks_4_1_transformer_blocks_0_attn1_to_q') in diffusers' UNet blocks.

    sgm numbers the blocks' layers in one flat list: input_blocks 1.. are (layers_per_block
    resnets [+ attentions], then a downsampler) per block; output_blocks one more layer per block.
    """
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    m = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)_?(\d*)_(.+)$", path)
    if not m:
        return path
    where, i, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if where == "middle_block":  # middle_block_{0,1,2}_<rest>: resnet, attention, resnet
        kind, index = [("resnets", 0), ("attentions", 0), ("resnets", 1)][i]
        return f"mid_block_{kind}_{index}_{_SGM_LEAVES.get(rest, rest)}"
    j = int(j or 0)
    if where == "input_blocks":
        block, layer = divmod(i - 1, layers_per_block + 1)
        head = "down_blocks"
        if rest == "op":
            return f"down_blocks_{block}_downsamplers_0_conv"
    else:
        block, layer = divmod(i, layers_per_block + 1)
        head = "up_blocks"
        if rest == "conv" and j > 0:
            return f"up_blocks_{block}_upsamplers_0_conv"
    kind = "resnets" if j == 0 else "attentions"
    return f"{head}_{block}_{kind}_{layer}_{_SGM_LEAVES.get(rest, rest)}"


# --------------------------------------------------------------------------- writing


def save_lora(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str],
              format: str = "diffusers", overwrite: bool = False) -> Path:
    """Write a LoRA as safetensors in the diffusers or kohya layout, with `metadata` in the header.

    (`t2i train lora` writes kohya's by default: every tool reads it; this function's default stays
    diffusers' for its existing callers.)

    `state_dict` is in either layout (the trainer's: diffusers, alpha/rank baked into lora_B).
    The kohya layout also gets kohya's `ss_*` fields so kohya/A1111 tools show rank, steps
    and base model. Written atomically; an existing file is refused unless `overwrite`.
    """
    path = Path(path)
    if format not in FORMATS:
        raise UsageError(f"unknown LoRA format {format!r}; use one of: {', '.join(FORMATS)}")
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"LoRA files are written as .safetensors; got {path.name}")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    diffusers_sd = to_diffusers(state_dict, metadata)  # alphas baked: the header's adapter config is spent
    bad = [k for k, v in diffusers_sd.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise NumericalError(f"LoRA weights contain NaN/inf ({len(bad)} tensors, e.g. {bad[0]}); not saved")
    header = {k: str(v) for k, v in (metadata or {}).items() if k != ADAPTER_METADATA_KEY}
    if format == "kohya":
        out = to_kohya(diffusers_sd)
        header.update(kohya_metadata(header, diffusers_sd))
    else:
        out = diffusers_sd
    header["format"] = "pt"
    out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # safetensors wraps its own I/O errors (a full disk) in SafetensorError
        with atomic_write(path, overwrite=overwrite, errors=(SafetensorError,)) as tmp:
            safetensors.torch.save_file(out, str(tmp), metadata=header)
    except FileExistsError:  # made while the LoRA was being written
        raise UsageError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
    return path


def kohya_metadata(metadata: dict[str, str], diffusers_sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """kohya's `ss_*` header fields (what kohya/A1111 tools display) from t2i's and the tensors."""
    downs = [v for k, v in diffusers_sd.items() if k.endswith(".lora_A.weight")]
    ranks = Counter(v.shape[0] for v in downs if v.dim() == 2 or v.shape[2:] == (1, 1))
    conv_ranks = Counter(v.shape[0] for v in downs if v.dim() == 4 and v.shape[2:] != (1, 1))
    rank = ranks.most_common(1)[0][0] if ranks else 0
    # alpha/rank is folded into lora_up, so the alpha these files mean (and store) is the rank; the alpha the
    # run trained with is kept under its own key
    out = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    if conv_ranks:  # LoCon: kohya's conv_dim/conv_alpha, as its scripts record them
        conv = conv_ranks.most_common(1)[0][0]
        out["ss_network_args"] = json.dumps({"conv_dim": str(conv), "conv_alpha": str(conv)})
    if metadata.get("t2i.alpha"):
        out["t2i.training_alpha"] = metadata["t2i.alpha"]
    if metadata.get("t2i.conv_alpha"):
        out["t2i.training_conv_alpha"] = metadata["t2i.conv_alpha"]
    pairs = {"t2i.steps": "ss_steps", "t2i.base_model": "ss_sd_model_name",
             "t2i.base_model_hash": "ss_new_sd_model_hash", "t2i.trigger": "modelspec.trigger_phrase",
             "t2i.prior_loss_weight": "ss_prior_loss_weight"}
    out.update({ss: metadata[t] for t, ss in pairs.items() if metadata.get(t)})
    if metadata.get("t2i.steps"):
        out["ss_max_train_steps"] = metadata["t2i.steps"]
    if metadata.get("t2i.resolution"):
        out["ss_resolution"] = f"({metadata['t2i.resolution']}, {metadata['t2i.resolution']})"
    return out


def convert_lora(src: str | Path, dst: str | Path, format: str, overwrite: bool = False,
                 allow_pickle: bool = False) -> Path:
    """Rewrite a LoRA file in another layout (`t2i lora convert`); the metadata comes along."""
    if format not in FORMATS:
        raise UsageError(f"unknown LoRA format {format!r}; use one of: {', '.join(FORMATS)}")
    if Path(dst).exists() and not overwrite:  # before reading a large file
        raise UsageError(f"{dst} exists; pass --overwrite to replace it")
    if Path(dst).resolve() == Path(src).resolve():
        raise UsageError(f"{dst} is the input file; write the converted LoRA elsewhere")
    sd, metadata = read_lora(src, allow_pickle)
    return save_lora(dst, sd, metadata, format=format, overwrite=overwrite)


# --------------------------------------------------------------------------- describing


@dataclass
class LoraInfo:
    """What `t2i lora info` shows about a LoRA file."""

    path: Path
    layout: str
    ranks: list[int]  # distinct ranks, ascending
    alphas: list[float]  # distinct alphas as stored (diffusers: implied by rank or adapter metadata)
    modules: dict[str, int]  # component -> number of LoRA modules
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        def span(values):
            text = [f"{v:g}" for v in values]
            return text[0] if len(text) == 1 else f"{text[0]}..{text[-1]} (varies by module)"

        parts = ", ".join(f"{c} {n}" for c, n in self.modules.items())
        lines = [f"file: {self.path}", f"format: {self.layout}", f"rank: {span(self.ranks)}",
                 f"alpha: {span(self.alphas)}", f"modules: {sum(self.modules.values())} ({parts})"]
        if self.metadata:
            lines.append("metadata:")
            width = max(len(k) for k in self.metadata)
            for k, v in sorted(self.metadata.items()):
                lines.append(f"  {k:<{width}}  {v}")
        else:
            lines.append("metadata: (none)")
        return "\n".join(lines)


def lora_info(path: str | Path, allow_pickle: bool = False) -> LoraInfo:
    """Layout, ranks, alphas, module count and header metadata of a LoRA file."""
    sd, metadata = read_lora(path, allow_pickle)
    layout = detect_layout(sd)
    found = lora_modules(sd, metadata)
    modules = {name: a.shape[0] for name, (a, _, _) in found.items()}
    alphas = {alpha for _, _, alpha in found.values()}
    counts = Counter(name.split(".", 1)[0] for name in modules)
    return LoraInfo(Path(path), layout, sorted(set(modules.values())), sorted(alphas),
                    {c: counts[c] for c in COMPONENTS if counts[c]}, metadata)
