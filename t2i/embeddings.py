"""Textual-inversion embeddings, as A1111 uses them: a file's name (its stem) in a prompt stands for its vectors.

Files (what A1111 and diffusers write), .safetensors by default; pickles (.pt/.bin) only with allow_pickle,
and then read with torch.load(weights_only=True):
    emb_params                 A1111's safetensors layout, (N, D)
    string_to_param            A1111's .pt layout: {"*": (N, D)} (also as "string_to_param.*" keys)
    learned_embeds / <token>   diffusers' layout: one tensor, (D,) or (N, D)
    clip_l + clip_g            SDXL: (N, 768) for the first text encoder, (N, 1280) for the second

A prompt's words are matched by token ids (a name's tokens in a row, as A1111 does); each match takes N
placeholder tokens in the 75-token chunk, all in one chunk, and the encoder sees the vectors in their place.
Names that match no file are just words. The hash A1111 records (`TI hashes`) is the first 12 hex of the
sha256 of the whole file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from t2i.errors import ModelLoadError, UsageError
from t2i.files import PICKLE_SUFFIXES, check_weight_file, file_sha256, load_pickled_weights

SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # a pickle under a name is refused, not overlooked
MAX_VECTORS = 75  # one chunk: A1111 keeps an embedding's vectors together in one
SDXL_KEYS = ("clip_l", "clip_g")  # the first and second text encoder's vectors
FOLDER = "embeddings"  # a model folder's own embeddings, used with it by default


@dataclass(frozen=True)
class Embedding:
    """One embedding file, read: `vectors` by text encoder ("" for one that fits any single encoder)."""

    name: str  # the file's stem: the word that calls it in a prompt
    path: Path
    hash: str  # A1111's short hash: 12 hex of the file's sha256
    vectors: dict[str, torch.Tensor] = field(repr=False)  # "" or "clip_l"/"clip_g" -> (N, D) float32

    @property
    def count(self) -> int:
        """Placeholder tokens it takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(v.shape[1] for v in self.vectors.values())

    def for_encoder(self, index: int, n_encoders: int, width: int) -> torch.Tensor:
        """The (N, D) vectors of text encoder `index` (of `n_encoders`), whose token embeddings are `width` wide;
        a one-line UsageError naming the file when they do not fit."""
        if n_encoders > 1:
            if "" in self.vectors:
                raise UsageError(f"embedding {self.path} has one set of vectors (width {self.widths[0]}); an SDXL "
                                 f"model needs clip_l and clip_g vectors (an SD 1.x/2.x embedding on an SDXL model?)")
            vec = self.vectors[SDXL_KEYS[index]]
        else:
            if "" not in self.vectors:
                raise UsageError(f"embedding {self.path} holds SDXL vectors (clip_l, clip_g); this model has one text "
                                 f"encoder of width {width} (an SDXL embedding on an SD 1.x/2.x model?)")
            vec = self.vectors[""]
        if vec.shape[1] != width:
            raise UsageError(f"embedding {self.path} has vectors of width {vec.shape[1]}; this model's text encoder "
                             f"takes {width} (an embedding for another model?); use one made for this model")
        return vec


def read(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file by text encoder ("" or clip_l/clip_g), each (N, D) float32; vetted
    (safetensors, or a pickle read weights-only when allowed) and checked: one-line errors naming the file."""
    path = Path(path)
    check_weight_file(path, allow_pickle)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - a header that passed the checks but does not load: one line
            raise ModelLoadError(f"embedding {path} could not be read ({str(e).splitlines()[0][:120]}); "
                                 "download it again") from None
    else:
        data = load_pickled_weights(path)
    return _layout(data, path)


def _layout(data: dict, path: Path) -> dict[str, torch.Tensor]:
    """A1111's, diffusers' and SDXL layouts -> {"" or clip_l/clip_g: (N, D)}."""
    params = data.get("string_to_param")
    if isinstance(params, dict):  # A1111's .pt: {"*": tensor}
        tensors = {"": t for t in params.values()} if len(params) == 1 else None
    elif all(k in data for k in SDXL_KEYS):
        tensors = {k: data[k] for k in SDXL_KEYS}
    else:
        found = {k: v for k, v in data.items() if torch.is_tensor(v)}
        tensors = {"": next(iter(found.values()))} if len(found) == 1 else None
    if tensors is None:
        names = ", ".join(sorted(map(str, data))[:4]) or "nothing"
        raise ModelLoadError(f"{path} is not an embedding: it holds {names}; an embedding holds one tensor "
                             "(emb_params, string_to_param, learned_embeds) or clip_l and clip_g (SDXL)")
    out = {}
    for key, t in tensors.items():
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() not in (1, 2) or t.numel() == 0:
            what = f"a {tuple(t.shape)} {t.dtype} tensor" if torch.is_tensor(t) else f"a {type(t).__name__}"
            raise ModelLoadError(f"embedding {path} holds {what}{f' as {key}' if key else ''}; an embedding's "
                                 "vectors are float, (vectors, width)")
        t = t.detach().float().reshape(-1, t.shape[-1])  # (N, D)
        if t.shape[0] > MAX_VECTORS:
            raise ModelLoadError(f"embedding {path} has {t.shape[0]} vectors; a prompt chunk holds {MAX_VECTORS}")
        if not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"embedding {path} holds NaN or inf values; download or train it again")
        out[key] = t
    if len({t.shape[0] for t in out.values()}) > 1:
        raise ModelLoadError(f"embedding {path}: clip_l and clip_g have different numbers of vectors")
    return out


def embedding_hash(path: str | Path) -> str:
    """A1111's `TI hashes` entry: the first 12 hex of the sha256 of the whole file."""
    return file_sha256(path)[:12]


def mentioned(name: str, prompt: str) -> bool:
    """Whether `name` may call an embedding in `prompt`, judged without a tokenizer (CLIP lowercases and splits
    words at letters/digits): what is vetted before a model loads. The tokens decide for good when encoding."""
    return re.search(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])", prompt.lower()) is not None


@dataclass
class EmbeddingSet:
    """The embeddings a pipeline finds by name: every weights file in `dirs` (the first folder holding a name
    wins), and `files` (name -> path, e.g. the ones an image records); read once, re-read when a file changes."""

    dirs: list[Path] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    allow_pickle: bool = False
    _read: dict[tuple, Embedding] = field(default_factory=dict, repr=False)

    def available(self) -> dict[str, Path]:
        """name -> file, for every embedding there is (nothing is read)."""
        found: dict[str, Path] = {}
        for folder in self.dirs:
            if Path(folder).is_dir():
                for p in sorted(Path(folder).iterdir()):
                    if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."):
                        found.setdefault(p.stem, p)
        return {**found, **{n: Path(p) for n, p in self.files.items()}}

    def load(self, name: str, path: Path) -> Embedding:
        path = Path(path)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, name)
        if key not in self._read:
            self._read[key] = Embedding(name, path, embedding_hash(path), read(path, self.allow_pickle))
        return self._read[key]

    def vet(self, prompts: list[str]) -> list[Embedding]:
        """Read every embedding the prompts may call (see `mentioned`): a broken or hostile file fails here, in
        one line, before a model loads."""
        return [self.load(n, p) for n, p in self.available().items() if any(mentioned(n, t) for t in prompts)]

    def lookup(self, tokenizer, prompts: list[str]) -> dict[int, list[tuple[list[int], Embedding]]]:
        """For `prompts.tokenize`: first token id -> [(the name's token ids, embedding)], longest first; only the
        embeddings the prompts may call are read."""
        table: dict[int, list[tuple[list[int], Embedding]]] = {}
        for emb in self.vet(prompts):
            ids = tokenizer(emb.name, add_special_tokens=False, truncation=False).input_ids
            if ids:
                table.setdefault(ids[0], []).append((ids, emb))
        for entries in table.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)
        return table


def model_folder_dir(path: str | Path | None) -> Path | None:
    """A model folder's own embeddings/ folder, if it has one."""
    if path is None or not Path(path).is_dir():
        return None
    folder = Path(path) / FOLDER
    return folder if folder.is_dir() else None
