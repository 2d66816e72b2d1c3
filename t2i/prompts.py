"""Prompt syntax and encoding, as A1111 users type it.

- `(word)` multiplies attention by 1.1, `[word]` divides by 1.1, `(word:1.3)` sets
  a factor; they nest and multiply. `\\(` and `\\)` are literal brackets.
- `BREAK` (upper case, a word of its own) starts a new 75-token chunk.
- `<lora:NAME:0.8>` is taken out of the text and returned for the LoRA loader.
- Prompts longer than the text encoder's window are split into 75-token chunks,
  each encoded as its own 77-token window, and the embeddings concatenated,
  instead of being cut off.

Weights are applied the way A1111 does: each token's embedding is multiplied by
its weight, then the whole chunk is rescaled so its mean is what it was.
"""

from __future__ import annotations

import re
import contextlib
from dataclasses import dataclass, field

import torch

ROUND = 1.1
SQUARE = 1 / 1.1
CHUNK = 75  # tokens per window, without the start and end tokens
COMMA_BACKTRACK = 20  # a full chunk is cut at its last comma if that is this close to the end
MEAN_FLOOR = 1e-3  # a chunk mean below this share of the mean magnitude is not restored (see _apply_weights)
MIN_WEIGHT = 1e-2  # weights below this bound the mean-restoring factor as this one would

_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_LORA = re.compile(r"<lora:([^:>]+)(?::([+-]?(?:\d+\.?\d*|\.\d+)))?(?::[^>]*)?>")


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # BREAK fragments have weight -1 and empty text


def parse(text: str) -> list[Fragment]:
    """Split a prompt into (text, weight) fragments following A1111's attention syntax."""
    out: list[list] = []  # [text, weight] pairs, mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in out[start:]:
            if item[1] >= 0:
                item[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, number = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            out.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(out))
        elif tok == "[":
            square_open.append(len(out))
        elif number is not None and round_open:
            scale_from(round_open.pop(), float(number))
        elif tok == ")" and round_open:
            scale_from(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            scale_from(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    out.append(["", -1.0])
                out.append([part, 1.0])
    for start in round_open:  # unclosed brackets still count, as in A1111
        scale_from(start, ROUND)
    for start in square_open:
        scale_from(start, SQUARE)
    merged: list[list] = []
    for item in out:
        if merged and merged[-1][1] == item[1] and item[1] >= 0:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    frags = [Fragment(t, w) for t, w in merged if t or w < 0]
    return frags or [Fragment("", 1.0)]


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take `<lora:NAME:SCALE>` tags out of a prompt: (clean prompt, [(NAME, SCALE)])."""
    found = [(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0) for m in _LORA.finditer(prompt)]
    clean = re.sub(r"\s{2,}", " ", _LORA.sub("", prompt)).strip()
    return clean, found


def plain_text(prompt: str) -> str:
    """The prompt as the words the encoder sees: syntax and LoRA tags removed."""
    clean, _ = extract_loras(prompt)
    return "".join(f.text if f.weight >= 0 else " " for f in parse(clean))


# --------------------------------------------------------------------------- tokens


@dataclass
class Chunk:
    ids: list[int]  # at most CHUNK real token ids (no start, end or padding)
    weights: list[float]
    # textual inversion: (index in ids, embedding) of each embedding's placeholder tokens (see t2i.embeddings)
    embeddings: list[tuple[int, object]] = field(default_factory=list)


def tokenize(tokenizer, prompt: str, embeddings: dict | None = None) -> list[Chunk]:
    """Weighted token chunks of CHUNK tokens each (A1111's layout: commas and BREAK respected).

    `embeddings` (EmbeddingSet.lookup): a run of token ids that spells an embedding's name becomes its N
    placeholder tokens, kept in one chunk, carrying the fragment's weight.
    """
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    placeholder = tokenizer.bos_token_id  # any id but the end token's (CLIP pools at the end token)
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, object]] = []
    last_comma = -1

    def flush() -> None:
        nonlocal ids, weights, fixes, last_comma
        chunks.append(Chunk(ids, weights, fixes))
        ids, weights, fixes, last_comma = [], [], [], -1

    for frag in parse(prompt):
        if frag.weight < 0:  # BREAK
            flush()
            continue
        tokens = tokenizer(frag.text, add_special_tokens=False, truncation=False).input_ids
        pos = 0
        while pos < len(tokens):
            tid = tokens[pos]
            if tid == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # Move the words after the last comma into the next chunk, keeping a phrase whole.
                cut = last_comma + 1
                rest_ids, rest_w = ids[cut:], weights[cut:]
                rest_fixes = [(i - cut, e) for i, e in fixes if i >= cut]
                ids, weights, fixes = ids[:cut], weights[:cut], [(i, e) for i, e in fixes if i < cut]
                flush()
                ids, weights, fixes = rest_ids, rest_w, rest_fixes
            if len(ids) == CHUNK:
                flush()
            emb, spelled = _embedding_at(embeddings, tokens, pos)
            if emb is None:
                ids.append(tid)
                weights.append(frag.weight)
                pos += 1
                continue
            if len(ids) + emb.count > CHUNK:  # an embedding's vectors stay together
                flush()
            fixes.append((len(ids), emb))
            ids += [placeholder] * emb.count
            weights += [frag.weight] * emb.count
            pos += spelled
    if ids or not chunks:
        flush()
    return chunks


def _embedding_at(embeddings: dict | None, tokens: list[int], pos: int):
    """(embedding, how many tokens spell its name) if one's name starts at tokens[pos], else (None, 0)."""
    for ids, emb in (embeddings or {}).get(tokens[pos], ()):
        if tokens[pos:pos + len(ids)] == ids:
            return emb, len(ids)
    return None, 0


def used_embeddings(chunks: list[Chunk]) -> list:
    """The embeddings the chunks call, each once, in order of appearance."""
    return list({id(e): e for c in chunks for _, e in c.embeddings}.values())


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def count_tokens(tokenizer, prompt: str) -> int:
    clean, _ = extract_loras(prompt)
    return sum(len(tokenizer(f.text, add_special_tokens=False).input_ids) for f in parse(clean) if f.weight >= 0)


def _window(tokenizer, chunk: Chunk, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Start, tokens, end, then padding: the layout diffusers uses, so a short prompt
    # encodes exactly as in a stock pipeline (CLIP pools at the end token).
    pad = CHUNK - len(chunk.ids)
    ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id] + [_pad_id(tokenizer)] * pad
    weights = [1.0, *chunk.weights, 1.0] + [1.0] * pad
    return torch.tensor([ids], device=device), torch.tensor(weights, device=device)


def _apply_weights(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111: scale each token's embedding by its weight, then restore the chunk's mean."""
    if bool((w == 1.0).all()):
        return z
    before = z.float().mean()
    weighted = z * w.to(z.dtype)[None, :, None]  # (1, 77, D)
    return weighted * _mean_restoring_factor(before, weighted.float(), w).to(z.dtype)


def _mean_restoring_factor(before: torch.Tensor, weighted: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's before / after, where the means carry information; 1 where they do not.

    A chunk whose mean is near zero against its typical magnitude (a final layer norm
    makes each token's mean 0) has a mean that is mostly rounding: its ratio is noise,
    0/0 or huge. If all entries shared a sign, the ratio would lie between 1/max(w) and
    1/min(w); beyond that range it is cancellation, so it is clamped there.
    """
    after = weighted.mean()
    floor = MEAN_FLOOR * weighted.abs().mean()
    if before.abs() <= floor or after.abs() <= floor:
        return torch.ones((), dtype=weighted.dtype, device=weighted.device)
    low, high = 1 / w.max().clamp(min=1.0), 1 / w.min().clamp(min=MIN_WEIGHT, max=1.0)
    return (before / after).clamp(low, high)


@dataclass
class Encoded:
    embeds: torch.Tensor  # (1, 77 * chunks, D)
    pooled: torch.Tensor | None = None  # SDXL: (1, 1280)
    used: list = field(default_factory=list)  # the textual-inversion embeddings the prompt called


@contextlib.contextmanager
def _vectors_in(text_encoder, chunk: Chunk, index: int, n_encoders: int):
    """While encoding `chunk`'s window: the token embedding layer gives each embedding's vectors in place of its
    placeholders (A1111's way: before the position embeddings are added). Nothing changes without embeddings."""
    if not chunk.embeddings:
        yield
        return
    layer = text_encoder.get_input_embeddings()
    width = layer.embedding_dim
    rows = [(i + 1, e.for_encoder(index, n_encoders, width)) for i, e in chunk.embeddings]  # +1: the start token

    def put_vectors(module, args, out):  # out (1, 77, D)
        out = out.clone()
        for pos, vec in rows:
            out[:, pos:pos + vec.shape[0]] = vec.to(out.device, out.dtype)  # (N, D)
        return out

    handle = layer.register_forward_hook(put_vectors)
    try:
        yield
    finally:
        handle.remove()


def encode_sd(tokenizer, text_encoder, prompt: str, clip_skip: int | None = None, embeddings: dict | None = None,
              grad: bool = False) -> Encoded:
    """SD 1.x/2.x: last hidden state per chunk, concatenated; or, with A1111's clip skip N > 1, the output of
    the N-th layer from the end (hidden_states[-N]) through the final layer norm, as A1111's
    sd_hijack_clip applies it (1 or None: the last layer, the norm included as the encoder applies it).

    `embeddings`: EmbeddingSet.lookup's table (textual inversion); `grad`: keep the graph (training one).
    """
    device = text_encoder.device
    parts = []
    chunks = tokenize(tokenizer, prompt, embeddings)
    for chunk in chunks:
        ids, w = _window(tokenizer, chunk, device)
        with (torch.enable_grad() if grad else torch.no_grad()), _vectors_in(text_encoder, chunk, 0, 1):
            if clip_skip and clip_skip > 1:
                out = text_encoder(ids, output_hidden_states=True)
                norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 | 5
                z = norm(out.hidden_states[-clip_skip])  # (1, 77, D)
            else:
                z = text_encoder(ids)[0]  # (1, 77, D)
        parts.append(_apply_weights(z, w))
    return Encoded(torch.cat(parts, dim=1), used=used_embeddings(chunks))


def encode_sdxl(tokenizers, text_encoders, prompt: str, zero: bool = False, embeddings: list | None = None
                ) -> Encoded:
    """SDXL: both encoders' penultimate states side by side per chunk; pooled from the first chunk.

    `embeddings`: EmbeddingSet.lookup's table for each tokenizer (textual inversion: clip_l, clip_g vectors).
    """
    tables = embeddings or [None] * len(tokenizers)
    chunk_lists = [tokenize(tok, prompt, table) for tok, table in zip(tokenizers, tables)]
    n = max(len(c) for c in chunk_lists)
    for tok, chunks in zip(tokenizers, chunk_lists):  # the two BPEs agree; this only guards the odd case
        chunks += [Chunk([], []) for _ in range(n - len(chunks))]
    parts, pooled = [], None
    for i in range(n):
        per_encoder = []
        for k, (tok, enc, chunks) in enumerate(zip(tokenizers, text_encoders, chunk_lists)):
            ids, w = _window(tok, chunks[i], enc.device)
            with torch.no_grad(), _vectors_in(enc, chunks[i], k, len(text_encoders)):
                out = enc(ids, output_hidden_states=True)
            if pooled is None and enc is text_encoders[-1]:
                pooled = out[0]  # (1, 1280) text_embeds of the projection model
            per_encoder.append(_apply_weights(out.hidden_states[-2], w))  # (1, 77, D_i)
        parts.append(torch.cat(per_encoder, dim=-1))  # (1, 77, 2048)
    embeds = torch.cat(parts, dim=1)
    if zero:  # SDXL's "force zeros for empty prompt"
        return Encoded(torch.zeros_like(embeds), torch.zeros_like(pooled))
    return Encoded(embeds, pooled, used=used_embeddings(chunk_lists[0]))


def pad_to_same_length(a: Encoded, b: Encoded, empty: Encoded) -> tuple[Encoded, Encoded]:
    """Cond and uncond must have the same number of chunks: pad the shorter with empty chunks."""
    la, lb = a.embeds.shape[1], b.embeds.shape[1]
    if la == lb:
        return a, b
    if la < lb:
        b, a = pad_to_same_length(b, a, empty)
        return a, b
    reps = (la - lb) // empty.embeds.shape[1]
    return a, Encoded(torch.cat([b.embeds, *[empty.embeds] * reps], dim=1), b.pooled, b.used)
