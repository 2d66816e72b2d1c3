"""A1111 prompt syntax: weights, escapes, BREAK, LoRA tags, and 75-token chunks."""

from __future__ import annotations

import pytest
import torch

from t2i import prompts
from t2i.prompts import CHUNK, Fragment, parse


def weights(text: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 6)) for f in parse(text)]


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a)", [("a", 1.1)]),
    ("[a]", [("a", round(1 / 1.1, 6))]),
    ("((a))", [("a", 1.21)]),
    ("[[a]]", [("a", round(1 / 1.21, 6))]),
    ("((a:2))", [("a", 2.2)]),
    ("x (a:0.5) y", [("x ", 1.0), ("a", 0.5), (" y", 1.0)]),
    ("(a, (b:2))", [("a, ", 1.1), ("b", 2.2)]),
    ("(a", [("a", 1.1)]),  # unclosed still counts, as in A1111
])
def test_weights(text, expected):
    assert weights(text) == expected


def test_escaped_brackets_are_literal():
    assert parse(r"\(a\) \[b\]") == [Fragment("(a) [b]", 1.0)]
    assert weights(r"(\(a\):1.5)") == [("(a)", 1.5)]


def test_colon_without_a_number_is_text():
    assert prompts.plain_text("(ratio: wide)") == "ratio: wide"


def test_break_is_a_fragment_and_a_new_chunk(tokenizer):
    assert [f.weight for f in parse("red BREAK blue")] == [1.0, -1.0, 1.0]
    assert parse("BREAKFAST") == [Fragment("BREAKFAST", 1.0)]  # only the word BREAK
    chunks = prompts.tokenize(tokenizer, "red circle BREAK blue")
    assert [len(c.ids) for c in chunks] == [2, 1]
    assert len(prompts.tokenize(tokenizer, "red circle blue")) == 1


def test_extract_loras():
    assert prompts.extract_loras("x <lora:foo:0.7>") == ("x", [("foo", 0.7)])
    assert prompts.extract_loras("<lora:a> b <lora:c:-1.5> d") == ("b d", [("a", 1.0), ("c", -1.5)])
    assert prompts.plain_text("(cat:1.2) <lora:foo:0.7>") == "cat"


def test_weights_reach_the_tokens(tokenizer):
    (chunk,) = prompts.tokenize(tokenizer, "red (circle:1.5)")
    assert chunk.weights == [1.0, 1.5]


def test_long_prompts_split_at_75_tokens(tokenizer):
    chunks = prompts.tokenize(tokenizer, "red " * 160)
    assert [len(c.ids) for c in chunks] == [CHUNK, CHUNK, 10]


def test_a_full_chunk_breaks_at_its_last_comma(tokenizer):
    text = "red " * 70 + ", " + "blue " * 10
    first, second = prompts.tokenize(tokenizer, text)
    assert len(first.ids) == 71  # 70 words and the comma; the phrase after it moves on whole
    assert len(second.ids) == 10


class _Shifted(torch.nn.Module):
    """A text encoder whose output is the tiny one's plus `shift`: a chunk mean well away from zero,
    as a real CLIP's is, whatever the CPU rounds the tiny encoder's (layer-normed, mean ~0) output to."""

    def __init__(self, encoder, shift: float):
        super().__init__()
        self.encoder, self.shift = encoder, shift

    @property
    def device(self):
        return self.encoder.device

    def forward(self, ids, **kwargs):
        return (self.encoder(ids)[0] + self.shift,)


class _Alternating(torch.nn.Module):
    """A text encoder whose output is +1, -1, +1, ... in every token: the chunk mean is exactly 0 on any CPU."""

    device = torch.device("cpu")

    def forward(self, ids, **kwargs):
        z = torch.ones(1, ids.shape[1], 32)
        z[..., 1::2] = -1.0
        return (z,)


def test_weighted_encoding_keeps_the_mean_and_changes_the_tokens(sd_pipe):
    tok, enc = sd_pipe.pipe.tokenizer, _Shifted(sd_pipe.pipe.text_encoder, 0.5)
    plain = prompts.encode_sd(tok, enc, "red circle").embeds
    weighted = prompts.encode_sd(tok, enc, "red (circle:1.5)").embeds
    assert not torch.equal(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)


def test_a_chunk_with_a_zero_mean_is_weighted_without_nan(sd_pipe):
    """0/0 in the mean restore gave NaN embeddings (and black images) where the mean rounds to exactly 0."""
    tok, enc = sd_pipe.pipe.tokenizer, _Alternating()
    z = enc(torch.zeros(1, 77, dtype=torch.long))[0]
    got = prompts.encode_sd(tok, enc, "red (circle:1.5)").embeds
    assert torch.isfinite(got).all()
    expected = z.clone()
    expected[:, 2] *= 1.5  # nothing to restore: the weights alone, as A1111 would give if its mean were not 0/0
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shift", [1e-7, -1e-7, 0.0])
def test_a_mean_near_zero_gives_no_huge_factor(sd_pipe, shift):
    """A mean that is rounding noise must not be restored: its ratio could be anything."""
    tok, enc = sd_pipe.pipe.tokenizer, _Shifted(sd_pipe.pipe.text_encoder, shift)
    plain = prompts.encode_sd(tok, enc, "red circle").embeds
    got = prompts.encode_sd(tok, enc, "red (circle:1.5)").embeds
    assert torch.isfinite(got).all()
    assert got.abs().max() <= 1.5 * plain.abs().max() + 1e-6


def test_the_restoring_factor_stays_within_what_the_weights_allow():
    """Mixed signs can cancel the weighted chunk's mean without cancelling the original's (A1111: factor 5)."""
    z = torch.tensor([[[3.0, 0.0], [-2.0, 0.0]]])  # (1, 2 tokens, 2): mean 0.25
    w = torch.tensor([1.0, 1.4])
    weighted = z * w[None, :, None]  # mean 0.05
    assert prompts._mean_restoring_factor(z.mean(), weighted, w) == 1.0  # 1/max(w) <= factor <= 1/min(w, 1)
    same_sign = z.abs()  # here the ratio is a real mean's: A1111's factor, unchanged
    weighted = same_sign * w[None, :, None]
    assert torch.allclose(prompts._mean_restoring_factor(same_sign.mean(), weighted, w),
                          same_sign.mean() / weighted.mean())


def test_cond_and_uncond_are_padded_to_the_same_length(sd_pipe):
    tok, enc = sd_pipe.pipe.tokenizer, sd_pipe.pipe.text_encoder
    long, short = prompts.encode_sd(tok, enc, "red " * 100), prompts.encode_sd(tok, enc, "")
    a, b = prompts.pad_to_same_length(long, short, short)
    assert a.embeds.shape == b.embeds.shape == (1, 154, 32)
    b2, a2 = prompts.pad_to_same_length(short, long, short)
    assert a2.embeds.shape == b2.embeds.shape


def _stock_window(tok, enc, text):
    """What diffusers' own encode_prompt feeds CLIP: start, tokens, end, padding to 77."""
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc(ids.input_ids)[0]  # (1, 77, D)


def test_unweighted_prompts_encode_exactly_as_stock_diffusers(sd_pipe):
    p = sd_pipe.pipe
    stock, _ = p.encode_prompt("red circle", "cpu", 1, False)
    assert torch.equal(prompts.encode_sd(p.tokenizer, p.text_encoder, "red circle").embeds, stock)


@pytest.mark.parametrize("text, weights", [
    ("red (circle:1.5)", {2: 1.5}),
    ("(red) [circle]", {1: 1.1, 2: 1 / 1.1}),
    ("((red:0.5) circle)", {1: 0.55, 2: 1.1}),
])
def test_weights_change_the_embeddings_as_a1111_by_hand(sd_pipe, text, weights):
    """A1111 (sd_hijack_clip): z = CLIP(tokens); z *= weight per token; z *= mean(z before) / mean(z after)."""
    tok, enc = sd_pipe.pipe.tokenizer, _Shifted(sd_pipe.pipe.text_encoder, 0.5)
    z = _stock_window(tok, enc, "red circle")  # positions: 0 start, 1 red, 2 circle, 3 end, padding
    w = torch.ones(z.shape[1])
    for position, weight in weights.items():
        w[position] = weight
    expected = z * w[None, :, None]
    expected = expected * (z.mean() / expected.mean())
    got = prompts.encode_sd(tok, enc, text).embeds
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_chunks_are_encoded_separately_and_concatenated(sd_pipe):
    """BREAK (and the 75-token limit) starts a new 77-token window; windows are encoded alone, then joined."""
    tok, enc = sd_pipe.pipe.tokenizer, sd_pipe.pipe.text_encoder
    got = prompts.encode_sd(tok, enc, "red circle BREAK blue square").embeds
    expected = torch.cat([_stock_window(tok, enc, "red circle"), _stock_window(tok, enc, "blue square")], dim=1)
    assert torch.equal(got, expected)
