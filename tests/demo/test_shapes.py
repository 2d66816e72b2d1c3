"""The training distribution of the shapes world: fixed by the seed, never showing held-out compositions, and
leaned by a SceneMix without changing what a seed means."""

from __future__ import annotations

import dataclasses
import re

import pytest

from t2i.demo.shapes import (COLORS, HELD_OUT_PAIRS, HELD_OUT_RELATIONS, SceneMix, caption_words, extra_phrase, render,
                             sample_scene)

SEEDS = range(1500)
COLOUR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b")


def test_a_seed_always_gives_the_same_scene_and_pixels():
    for seed in (0, 7, 12345):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b and render(a).tobytes() == render(b).tobytes()
    assert len({sample_scene(s).caption for s in range(50)}) > 45


def test_held_out_compositions_never_appear_in_training_scenes():
    for seed in SEEDS:
        scene = sample_scene(seed)
        assert not {(o.color, o.shape) for o in scene.objects} & set(HELD_OUT_PAIRS), scene.caption
        if scene.relation:
            a, b = scene.objects
            assert (a.shape, scene.relation, b.shape) not in HELD_OUT_RELATIONS, scene.caption


def test_the_default_mix_draws_every_kind_in_its_shares():
    counts = {}
    for seed in SEEDS:
        kind = sample_scene(seed).kind
        counts[kind] = counts.get(kind, 0) + 1
    weights = SceneMix().kinds()
    for kind, weight in weights.items():
        assert counts[kind] / len(SEEDS) == pytest.approx(weight / sum(weights.values()), abs=0.04)


def test_a_mix_leans_the_kinds_and_colourless_captions():
    only_counts = SceneMix(single=0, count=1, pair=0, relation=0, triple=0)
    assert {sample_scene(s, mix=only_counts).kind for s in range(200)} == {"count"}
    plain = [sample_scene(s, mix=SceneMix(colorless=1.0)).caption for s in range(200)]
    assert not [c for c in plain if COLOUR_WORD.search(c)]
    named = [sample_scene(s, mix=SceneMix(colorless=0.0)).caption for s in range(200)]
    assert all(COLOUR_WORD.search(c) for c in named)


def test_a_mix_changes_which_kind_a_seed_picks_not_how_it_is_drawn():
    mix = SceneMix(count=30, colorless=0.3)
    same = changed = 0
    for seed in range(400):
        base, leaned = sample_scene(seed), sample_scene(seed, mix=mix)
        if base.kind == leaned.kind and bool(COLOUR_WORD.search(base.caption)) == bool(COLOUR_WORD.search(leaned.caption)):
            assert base == leaned
            same += 1
        else:
            changed += 1
    assert same > 200 and changed > 40


def test_four_draws_counting_scenes_of_four_objects_and_leaves_the_rest_alone():
    counts = SceneMix(single=0, count=1, pair=0, relation=0, triple=0, four=0.25)
    scenes = [sample_scene(s, mix=counts) for s in range(400)]
    fours = [s for s in scenes if len(s.objects) == 4]
    assert 0.18 < len(fours) / len(scenes) < 0.32
    assert all(re.search(r"\b(four|4) ", s.caption) for s in fours)
    assert not [s for s in scenes if len(s.objects) != 4 and re.search(r"\b(four|4) ", s.caption)]
    assert max(len(s.objects) for s in map(sample_scene, SEEDS)) == 3  # the default world: 1 to 3 objects
    for seed in range(300):  # only counting scenes draw differently
        base, leaned = sample_scene(seed), sample_scene(seed, mix=SceneMix(four=0.5))
        assert base == leaned or base.kind == leaned.kind == "count", base.caption


@pytest.mark.parametrize("change, words", [
    ({"count": -1.0}, "weights must be >= 0"),
    ({"single": 0, "count": 0, "pair": 0, "relation": 0, "triple": 0}, "positive sum"),
    ({"colorless": 1.5}, "between 0 and 1"),
    ({"four": -0.1}, "share of counting scenes"),
])
def test_a_bad_mix_names_its_problem(change, words):
    assert words in dataclasses.replace(SceneMix(), **change).problem()
    assert SceneMix().problem() is None


def test_extra_phrases_say_nothing_a_caption_can_say_and_follow_their_rng():
    """unet.caption_extras' phrases: no colour, shape, count, position or background word (a caption's meaning stays
    the image's), many different ones, the same for the same random state."""
    import random

    words = set(caption_words())
    phrases = [extra_phrase(random.Random(i)) for i in range(2000)]
    assert not {w for p in phrases for w in re.findall(r"[a-z0-9]+", p)} & words - {"in"}  # "in": "in X style"
    assert len(set(phrases)) > 1500
    assert phrases == [extra_phrase(random.Random(i)) for i in range(2000)]
    assert any(p.startswith("in ") and p.endswith(" style") for p in phrases)  # the shape of "in sks style"
