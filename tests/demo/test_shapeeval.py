"""ShapeEval: the prompt set, the classical checker, and the scoring around it."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from t2i.demo import shapes
from t2i.errors import UsageError
from t2i.demo.shapeeval import (
    CATEGORIES,
    PROMPTS,
    EvalPrompt,
    Want,
    _components,
    build_prompts,
    check,
    detect,
    evaluate,
    ground_truth_accuracy,
    ground_truth_scene,
    is_held_out_relation,
    save_grid,
)

BY_TEXT = {p.prompt: p for p in PROMPTS}


def truth(texts, seeds):
    """A perfect model: renders scenes that satisfy each ShapeEval prompt."""
    return [shapes.render(ground_truth_scene(BY_TEXT[t], s)) for t, s in zip(texts, seeds)]


# --------------------------------------------------------------------------- prompt set


def test_prompt_set_is_fixed_and_unique():
    assert build_prompts() == PROMPTS
    assert build_prompts(seed=1) != PROMPTS
    assert len(BY_TEXT) == len(PROMPTS)


def test_every_category_has_prompts():
    counts = Counter(p.category for p in PROMPTS)
    assert set(counts) == set(CATEGORIES)
    assert all(20 <= n <= 30 for n in counts.values()), counts


def test_held_out_flag_matches_the_compositions_used():
    for p in PROMPTS:
        pairs = {(w.color, w.shape) for w in p.objects if w.color}
        relation = p.relation and is_held_out_relation(p.objects[0].shape, p.relation, p.objects[1].shape)
        assert p.held_out == bool(pairs & shapes.HELD_OUT_PAIRS or relation), p.prompt


def test_held_out_subset_in_colour_and_position_categories():
    for category in ("colors", "color_attr", "position"):
        ps = [p for p in PROMPTS if p.category == category]
        assert 0.15 <= sum(p.held_out for p in ps) / len(ps) <= 0.25, category
    relations = [p for p in PROMPTS if p.category == "position" and p.relation]
    assert len(relations) > len([p for p in PROMPTS if p.category == "position"]) / 2


def test_prompts_use_only_training_vocabulary():
    vocabulary = set(shapes.caption_words())
    for p in PROMPTS:
        assert set(p.prompt.split()) <= vocabulary, p.prompt


# --------------------------------------------------------------------------- detection


def test_components_use_4_connectivity():
    labels = np.full((5, 6), -1)
    labels[0, 0] = labels[1, 1] = 0  # diagonal neighbours: two components
    labels[2:5, 2] = labels[4, 2:6] = labels[2:5, 5] = 1  # a U: one component, joined late
    labels[3, 4] = 2  # inside the U, another colour
    comp = _components(labels)
    assert comp[0, 0] != comp[1, 1]
    u = comp[labels == 1]
    assert (u == u[0]).all() and comp[3, 4] != u[0]
    assert (comp[labels < 0] == -1).all()
    assert len(np.unique(comp[labels >= 0])) == 4


def test_detect_reads_shape_colour_and_centre():
    objects = (
        shapes.ShapeObject("star", "purple", 14, 14.0, 15.0),
        shapes.ShapeObject("heart", "red", 24, 44.0, 20.0),
        shapes.ShapeObject("triangle", "cyan", 18, 30.0, 48.0),
    )
    for background in shapes.BACKGROUNDS:
        found = detect(shapes.render(shapes.Scene(objects, background, "")))
        assert len(found) == 3
        for obj in objects:
            d = min(found, key=lambda d: (d.cx - obj.cx) ** 2 + (d.cy - obj.cy) ** 2)
            assert (d.shape, d.color) == (obj.shape, obj.color)
            assert abs(d.cx - obj.cx) <= 1 and abs(d.cy - obj.cy) <= 1


def test_blank_image_has_no_objects():
    for rgb in shapes.BACKGROUNDS.values():
        assert detect(Image.new("RGB", (64, 64), rgb)) == []


# --------------------------------------------------------------------------- checking


def test_ground_truth_accuracy():
    accuracy = ground_truth_accuracy(n_per_prompt=2)
    assert set(CATEGORIES) <= set(accuracy)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_ground_truth_accuracy_checks_what_through_makes_of_the_renders():
    """`through` (a VAE's round trip for `t2i eval --ground-truth --through-vae`) is applied before checking."""
    picks = PROMPTS[::10]
    seen = []

    def erase(images):
        seen.extend(images)
        return [Image.new("RGB", im.size, "gray") for im in images]

    assert ground_truth_accuracy(1, picks, through=lambda images: images)["overall"] == 1.0
    assert ground_truth_accuracy(1, picks, through=erase)["overall"] == 0.0
    assert len(seen) == len(picks) and all(im.size == (64, 64) for im in seen)


def test_eval_through_vae_scores_renders_after_the_models_vae(tiny_sd, run_cli):
    """A random VAE destroys the renders, so its ceiling is near 0 where the checker alone scores 1."""
    code, out, err = run_cli("eval", "--ground-truth", "--through-vae", "--model", tiny_sd, "--seeds", 1, "-q")
    assert code == 0, err
    assert "through the model's VAE" in out
    overall = float(next(line.split()[-1] for line in out.splitlines() if line.startswith("overall")))
    assert overall < 0.5, out


def test_through_vae_without_ground_truth_is_refused_before_loading(run_cli, no_model_load):
    code, out, err = run_cli("eval", "--through-vae")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["t2i: error: --through-vae scores ground-truth renders; add --ground-truth"]


def test_checker_tolerates_blur():
    def blurry(texts, seeds):
        return [im.filter(ImageFilter.GaussianBlur(1.0)) for im in truth(texts, seeds)]

    assert evaluate(blurry, PROMPTS[::3], seeds=(0,)).overall >= 0.95


def _p(text, category, *objects, position=None, relation=None):
    return EvalPrompt(text, category, False, tuple(objects), position=position, relation=relation)


RED_CIRCLE = _p("a red circle", "colors", Want("circle", "red"))
TWO_STARS = _p("two stars", "counting", Want("star", count=2))
CIRCLE_AND_STAR = _p("a circle and a star", "two_object", Want("circle"), Want("star"))
CIRCLE = _p("a circle", "single_object", Want("circle", count=1))
CROSS_TOP = _p("a red cross at the top", "position", Want("cross", "red"), position="top")
STAR_ABOVE = _p("a star above a cross", "position", Want("star"), Want("cross"), relation="above")
RED_CIRCLE_BLUE_STAR = _p("a red circle and a blue star", "color_attr", Want("circle", "red"), Want("star", "blue"))

NEGATIVES = [  # (what is rendered, a prompt the render must fail)
    (RED_CIRCLE, _p("a blue circle", "colors", Want("circle", "blue"))),
    (RED_CIRCLE, _p("a red square", "colors", Want("square", "red"))),
    (TWO_STARS, _p("three stars", "counting", Want("star", count=3))),
    (TWO_STARS, _p("one star", "counting", Want("star", count=1))),
    (CIRCLE, _p("a square", "single_object", Want("square", count=1))),
    (CIRCLE_AND_STAR, CIRCLE),
    (CIRCLE, CIRCLE_AND_STAR),
    (CIRCLE_AND_STAR, _p("a circle and a heart", "two_object", Want("circle"), Want("heart"))),
    (CROSS_TOP, _p("a red cross at the bottom", "position", Want("cross", "red"), position="bottom")),
    (CROSS_TOP, _p("a red cross in the center", "position", Want("cross", "red"), position="center")),
    (STAR_ABOVE, _p("a star below a cross", "position", Want("star"), Want("cross"), relation="below")),
    (STAR_ABOVE, _p("a cross above a star", "position", Want("cross"), Want("star"), relation="above")),
    (RED_CIRCLE_BLUE_STAR, _p("a blue circle and a red star", "color_attr", Want("circle", "blue"), Want("star", "red"))),
]


@pytest.mark.parametrize("rendered, asked", NEGATIVES, ids=[f"{r.prompt} / {a.prompt}" for r, a in NEGATIVES])
def test_check_rejects_a_render_of_another_prompt(rendered, asked):
    for seed in range(4):
        image = shapes.render(ground_truth_scene(rendered, seed))
        assert check(image, rendered)  # the render is right for what it shows...
        assert not check(image, asked)  # ...and wrong for what it does not


# --------------------------------------------------------------------------- scoring


def test_evaluate_perfect_and_blank_generators():
    calls = []

    def perfect(texts, seeds):
        calls.append(len(texts))
        return truth(texts, seeds)

    prompts = PROMPTS[::4]
    report = evaluate(perfect, prompts, seeds=(0, 1), batch=8)
    assert max(calls) <= 8 and sum(calls) == 2 * len(prompts)
    assert report.overall == 1.0 and report.held_out == 1.0
    assert report.per_prompt == {p.prompt: 1.0 for p in prompts}
    for r in report.results:  # what the checker saw is kept: the prompt's objects, at least
        assert len(r.found) >= sum(w.count or 1 for w in r.prompt.objects), (r.prompt.prompt, r.found)

    blank = evaluate(lambda texts, seeds: [Image.new("RGB", (64, 64), (15, 15, 15)) for _ in texts], prompts)
    assert blank.overall == 0.0 and blank.held_out == 0.0
    assert set(blank.per_category.values()) == {0.0}
    assert all(r.found == () for r in blank.results)


def test_evaluate_rejects_missing_images():
    with pytest.raises(UsageError, match="returned 1 images"):
        evaluate(lambda texts, seeds: truth(texts, seeds)[:1], PROMPTS[:2], seeds=(0,))


def test_table_and_grid(tmp_path):
    report = evaluate(truth, PROMPTS[::6], seeds=(0, 1))
    table = report.table()
    for row in (*CATEGORIES, "overall", "held-out"):
        assert row in table
    report.grid(tmp_path / "grid.png")
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 66 + 2, len(PROMPTS[::6]) * 66 + 2)  # two seeds a row, 2 px gaps
    save_grid(report.images[:3], tmp_path / "three.png", columns=2)
    assert Image.open(tmp_path / "three.png").size == (2 * 66 + 2, 2 * 66 + 2)


def test_eval_writes_what_the_checker_saw_beside_each_verdict(tiny_sd, run_cli, tmp_path):
    """`t2i eval --out`: shapeeval.json says per image what was found, so a failure can be read, not guessed."""
    import json

    code, _, err = run_cli("eval", "--model", tiny_sd, "--seeds", 1, "--steps", 1, "-q", "--out", tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "shapeeval.json").read_text())["results"]
    assert len(results) == len(PROMPTS) and all(isinstance(r["found"], list) for r in results)
    assert all(f.count(" at (") == 1 and f.endswith(" px") for r in results for f in r["found"])
