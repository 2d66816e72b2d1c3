"""Textual-inversion embeddings: files in A1111's and diffusers' layouts, called by name in prompts, recorded
as A1111's `TI hashes` and replayed by `t2i reproduce`; bad files refused in one line before a model loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import one_line, pixels
from t2i import metadata, prompts
from t2i.embeddings import EmbeddingSet, read

WIDTH = 32  # the tiny models' text encoders (both of the tiny SDXL's)


def word_vector(pipe, word: str, encoder: int = 0) -> torch.Tensor:
    """(1, D): the token embedding of a one-token word."""
    toks, encs = pipe._text_encoders()
    (tid,) = toks[encoder](word, add_special_tokens=False).input_ids
    return encs[encoder].get_input_embeddings().weight[tid].detach().clone()[None]


@pytest.fixture
def emb_dir(tmp_path) -> Path:
    folder = tmp_path / "emb"
    folder.mkdir()
    return folder


def test_an_embedding_is_its_vectors_in_place_of_its_name(sd_pipe, emb_dir):
    """An embedding holding the token vector of "red" encodes exactly as the word "red" does, weights included."""
    save_file({"emb_params": word_vector(sd_pipe, "red")}, str(emb_dir / "zorb.safetensors"))
    sd_pipe.embeddings = EmbeddingSet([emb_dir])
    try:
        tok, te = sd_pipe.pipe.tokenizer, sd_pipe.pipe.text_encoder
        for with_name, plain in (("a zorb circle", "a red circle"), ("a (zorb:1.4) circle", "a (red:1.4) circle"),
                                 ("zorb, " * 30 + "zorb", "red, " * 30 + "red")):  # two chunks
            table = sd_pipe._embedding_tables(with_name)[0]
            got = prompts.encode_sd(tok, te, with_name, embeddings=table)
            want = prompts.encode_sd(tok, te, plain)
            assert torch.equal(got.embeds, want.embeds), with_name
            assert [e.name for e in got.used] == ["zorb"]
        # the name's words are gone from the prompt: not the same as the plain words
        no_file = prompts.encode_sd(tok, te, "a zorb circle")
        assert not torch.equal(no_file.embeds, prompts.encode_sd(tok, te, "a red circle").embeds)
    finally:
        sd_pipe.embeddings = EmbeddingSet()


def test_vectors_take_tokens_in_one_chunk_and_carry_the_weight(sd_pipe, emb_dir):
    save_file({"emb_params": torch.randn(3, WIDTH)}, str(emb_dir / "trio.safetensors"))
    tok = sd_pipe.pipe.tokenizer
    table = EmbeddingSet([emb_dir]).lookup(tok, ["trio"])
    chunks = prompts.tokenize(tok, "a (trio:1.5) circle", table)
    (chunk,) = chunks
    (pos, emb), = chunk.embeddings
    assert emb.count == 3 and chunk.weights[pos:pos + 3] == [1.5] * 3
    assert len(chunk.ids) == len(prompts.tokenize(tok, "a circle")[0].ids) + 3
    filler = len(prompts.tokenize(tok, "a circle")[0].ids)
    long = "a circle " * ((prompts.CHUNK - 1) // filler) + "trio"  # 74 tokens, then 3 vectors: the next chunk
    first, second = prompts.tokenize(tok, long, table)
    assert not first.embeddings and second.embeddings == [(0, emb)] and len(first.ids) < prompts.CHUNK


@pytest.mark.parametrize("layout", ["emb_params", "string_to_param.pt", "learned_embeds 1-D", "token key .bin"])
def test_a1111_and_diffusers_layouts_read(emb_dir, layout):
    v = torch.randn(2, WIDTH)
    if layout == "emb_params":
        path = emb_dir / "x.safetensors"
        save_file({"emb_params": v}, str(path))
    elif layout == "string_to_param.pt":
        path = emb_dir / "x.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 3}, path)
    elif layout == "learned_embeds 1-D":
        v = v[:1]
        path = emb_dir / "x.safetensors"
        save_file({"learned_embeds": v[0]}, str(path))
    else:
        v = v[:1]
        path = emb_dir / "x.bin"
        torch.save({"<x>": v[0]}, path)
    assert torch.equal(read(path, allow_pickle=True)[""], v)


def test_sdxl_embeddings_feed_each_text_encoder(sdxl_pipe, emb_dir):
    l, g = word_vector(sdxl_pipe, "red", 0), word_vector(sdxl_pipe, "red", 1)
    save_file({"clip_l": l, "clip_g": g}, str(emb_dir / "zorb.safetensors"))
    save_file({"clip_l": l, "clip_g": torch.zeros(1, WIDTH)}, str(emb_dir / "half.safetensors"))
    sdxl_pipe.embeddings = EmbeddingSet([emb_dir])
    try:
        toks, encs = sdxl_pipe._text_encoders()
        got = prompts.encode_sdxl(toks, encs, "a zorb circle", embeddings=sdxl_pipe._embedding_tables("zorb"))
        want = prompts.encode_sdxl(toks, encs, "a red circle")
        assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)
        half = prompts.encode_sdxl(toks, encs, "a half circle", embeddings=sdxl_pipe._embedding_tables("half"))
        assert torch.equal(half.embeds[..., :WIDTH], want.embeds[..., :WIDTH])  # clip_l went to the first
        assert not torch.equal(half.embeds[..., WIDTH:], want.embeds[..., WIDTH:])  # clip_g to the second
        settings = sdxl_pipe("a zorb circle", steps=1, seed=1, progress=False).settings[0]
        assert [e.name for e in settings.embeddings] == ["zorb"]
    finally:
        sdxl_pipe.embeddings = EmbeddingSet()


@pytest.mark.parametrize("content, words", [
    ({"emb_params": torch.zeros(1, 48)}, "has vectors of width 48; this model's text encoder takes 32"),
    ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, "an sdxl embedding on an sd 1.x/2.x model"),
])
def test_vectors_that_do_not_fit_the_model_are_one_line_naming_the_file(run_cli, tiny_sd, emb_dir, tmp_path,
                                                                         content, words):
    save_file(content, str(emb_dir / "wide.safetensors"))
    code, out, err = run_cli("generate", "a wide circle", "--model", tiny_sd, "--embedding-dir", emb_dir,
                             "--steps", "1", "--out", tmp_path / "o", "-q")
    line = one_line(err).lower()
    assert code == 2 and out == "" and str(emb_dir / "wide.safetensors").lower() in line and words in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, words", [
    ({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, "is not an embedding"),
    ({"emb_params": torch.full((1, 32), float("nan"))}, "nan or inf"),
    ({"emb_params": torch.zeros(1, 2, 32)}, "an embedding's vectors are float"),
    ({"emb_params": torch.zeros(80, 32)}, "has 80 vectors"),
])
def test_broken_embeddings_are_refused_before_the_model_loads(run_cli, emb_dir, tmp_path, no_model_load,
                                                              content, words):
    save_file(content, str(emb_dir / "bad.safetensors"))
    code, out, err = run_cli("generate", "a circle, bad", "--embedding-dir", emb_dir, "--out", tmp_path / "o")
    line = one_line(err).lower()
    assert code == 2 and out == "" and "bad.safetensors" in line and words in line, line


def test_pickles_need_allow_pickle_and_are_read_weights_only(run_cli, emb_dir, tmp_path, no_model_load, evil,
                                                             marker):
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, emb_dir / "plain.pt")
    code, _, err = run_cli("generate", "plain", "--embedding-dir", emb_dir, "--out", tmp_path / "o")
    assert code == 2 and "pickle" in one_line(err) and "--allow-pickle" in one_line(err)
    evil("emb/hostile.pt", zip_format=True)
    code, _, err = run_cli("generate", "hostile", "--embedding-dir", emb_dir, "--allow-pickle", "--out",
                           tmp_path / "o")
    assert code == 2 and "no code ran" in one_line(err) and not marker.exists()


def test_unknown_names_are_words_and_a_missing_folder_is_an_error(run_cli, emb_dir, tmp_path, no_model_load):
    code, _, err = run_cli("generate", "a", "--embedding-dir", tmp_path / "nope", "--out", tmp_path / "o")
    assert code == 2 and "--embedding-dir" in one_line(err)


def test_generate_records_ti_hashes_and_reproduce_replays_them(run_cli, tiny_sd, emb_dir, tmp_path):
    torch.manual_seed(0)
    path = emb_dir / "zorb.safetensors"
    save_file({"emb_params": torch.randn(2, WIDTH)}, str(path))
    common = ["--model", tiny_sd, "--steps", "2", "--seed", "3", "-q"]
    code, out, err = run_cli("generate", "a zorb circle", "--embedding-dir", emb_dir, *common, "--out", tmp_path / "a")
    assert code == 0, err
    png = Path(out.split()[0])
    text, settings = metadata.read(png)
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # A1111: sha256 of the whole file
    assert f'TI hashes: "zorb: {short}"' in text.splitlines()[-1]  # quoted, as A1111 quotes a value with ':'
    assert [(e.name, e.hash, e.path) for e in settings.embeddings] == [("zorb", short, str(path))]
    assert metadata.parse_a1111(text)["TI hashes"] == f"zorb: {short}"
    code, out, err = run_cli("generate", "a zorb circle", *common, "--out", tmp_path / "b")  # no folder: a word
    other = Path(out.split()[0])
    assert not np.array_equal(pixels(Image.open(png)), pixels(Image.open(other)))
    assert "TI hashes" not in metadata.read(other)[0] and metadata.read(other)[1].embeddings == []
    code, out, err = run_cli("reproduce", png)
    assert code == 0 and "bit for bit" in out, out + err
    save_file({"emb_params": torch.randn(2, WIDTH)}, str(path))  # another file under the recorded name
    code, _, err = run_cli("reproduce", png)
    assert code == 2 and "not the one" in one_line(err)
    path.unlink()
    code, _, err = run_cli("reproduce", png)
    assert code == 2 and "zorb.safetensors" in one_line(err) and "missing" in one_line(err)


def test_a_model_folders_own_embeddings_folder_is_used(run_cli, sd_copy, tmp_path):
    (sd_copy / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(1, WIDTH)}, str(sd_copy / "embeddings" / "zorb.safetensors"))
    code, out, err = run_cli("generate", "a zorb circle", "--model", sd_copy, "--steps", "1", "-q", "--out",
                             tmp_path / "o")
    assert code == 0, err
    assert [e.name for e in metadata.read(out.split()[0])[1].embeddings] == ["zorb"]


def test_a_negative_prompt_calls_embeddings_too(sd_pipe, emb_dir):
    save_file({"emb_params": torch.randn(1, WIDTH)}, str(emb_dir / "ugly.safetensors"))
    sd_pipe.embeddings = EmbeddingSet([emb_dir])
    try:
        with_emb = sd_pipe("a circle", negative_prompt="ugly", steps=1, seed=1, progress=False)
    finally:
        sd_pipe.embeddings = EmbeddingSet()
    plain = sd_pipe("a circle", negative_prompt="ugly", steps=1, seed=1, progress=False)
    assert [e.name for e in with_emb.settings[0].embeddings] == ["ugly"] and not plain.settings[0].embeddings
    assert not np.array_equal(pixels(with_emb.images[0]), pixels(plain.images[0]))
    assert 'TI hashes: "ugly: ' in metadata.a1111_parameters(with_emb.settings[0])
    assert json.loads(json.dumps(with_emb.settings[0].to_dict()))["embeddings"][0]["name"] == "ugly"
