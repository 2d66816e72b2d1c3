"""The demo model's tokenizer: a CLIP-format BPE tokenizer in which every word of the shapes world is one token."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from t2i.demo.shapes import caption_words
from t2i.train.demo.config import DemoConfig

log = logging.getLogger(__name__)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to a word's pieces, lowest rank first (what CLIPTokenizer does)."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_tokenizer(cfg: DemoConfig, out: Path):
    """A CLIP-format BPE tokenizer in which every word of the shapes world is one token.

    Built deterministically (no trainer: BPE trainers break ties differently run to
    run): the 256 byte characters, each also as a word end (`x</w>`), then for each
    world word in sorted order just the merges that make it a single token. Any
    other text still tokenizes, character by character. Stock CLIPTokenizer loads it.
    """
    from transformers import CLIPTokenizer

    byte_chars = _bytes_to_unicode()
    alphabet = list(byte_chars.values())
    vocab = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab)
    for word in sorted(caption_words()):
        encoded = "".join(byte_chars[b] for b in word.encode("utf-8"))
        pieces = _bpe([*encoded[:-1], encoded[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # join the first two pieces left, until the word is whole
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                vocab.append(pair[0] + pair[1])
            pieces = _bpe(pieces, ranks)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                        model_max_length=cfg.tokenizer.max_length)
    tok.save_pretrained(str(out))
    tok = CLIPTokenizer.from_pretrained(str(out))
    for w in caption_words():  # every world word must be a single token
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {w!r} into {len(ids)} tokens")
    return tok


def stage_tokenizer(cfg: DemoConfig) -> None:
    """Stage tokenizer: build it into <output_dir>/tokenizer."""
    out = Path(cfg.output_dir) / "tokenizer"
    tok = build_tokenizer(cfg, out)
    log.info("tokenizer: %d tokens -> %s", len(tok), out)
