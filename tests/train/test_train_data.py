"""Fine-tuning data: scanning, captions, bad files, image modes, buckets, batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from t2i.errors import UsageError
from t2i.images import load_rgb, to_rgb
from t2i.train.data import BatchPlan, bucket_sizes, fit, nearest_bucket, scan, with_trigger


def _img(path, size=(32, 32), color=(200, 30, 30), mode="RGB"):
    Image.new("RGB", size, color).convert(mode).save(path)
    return path


def test_captions_from_txt_and_jsonl_and_the_trigger_alone(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red   circle\n")
    _img(tmp_path / "b.png")
    _img(tmp_path / "c.jpg")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "c.jpg", "text": "a blue square"}) + "\n")
    ds = scan(tmp_path)
    captions = {it.path.name: it.caption for it in ds.items}
    assert captions == {"a.png": "a red circle", "b.png": "", "c.jpg": "a blue square"}
    assert with_trigger("", "in sks style") == "in sks style"
    assert with_trigger("a red circle", "in sks style") == "a red circle, in sks style"


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UsageError, match=r"no usable images \(found: \.md\)"):
        scan(tmp_path)
    with pytest.raises(UsageError, match="is not a folder"):
        scan(tmp_path / "missing")


def test_corrupt_image_and_unreadable_caption_are_skipped_and_reported(tmp_path):
    _img(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "fake.jpg").write_text("<html>not an image</html>")
    _img(tmp_path / "badcap.png")
    (tmp_path / "badcap.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3")
    ds = scan(tmp_path)
    assert [it.path.name for it in ds.items] == ["good.png"]
    report = ds.report()
    assert "3 skipped" in report and "truncated.png" in report and "fake.jpg" in report and "badcap.txt" in report


def test_only_broken_files_is_an_error_naming_them(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UsageError, match="x.png: not a readable image"):
        scan(tmp_path)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_every_common_mode_becomes_8bit_rgb(tmp_path, mode):
    if mode == "I;16":
        a = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # uses the full 16-bit range
        Image.fromarray(a).save(tmp_path / "x.png")  # 16-bit greyscale PNG
        assert Image.open(tmp_path / "x.png").mode.startswith("I")
    elif mode == "CMYK":
        _img(tmp_path / "x.jpg", mode="CMYK")
    else:
        _img(tmp_path / "x.png", mode=mode)
    path = next(tmp_path.iterdir())
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (32, 32)
    if mode == "I;16":  # scaled, not clipped to white
        a = np.asarray(img)[..., 0]
        assert a.min() == 0 and 100 < a.mean() < 160


def test_transparent_pixels_become_the_background_not_black():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def test_not_an_image_is_a_one_line_error(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(UsageError, match="x.png is not a readable image"):
        load_rgb(tmp_path / "x.png")


def test_buckets_keep_pixel_count_and_are_divisible():
    buckets = bucket_sizes(512, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 0.4 <= w / h <= 2.5
    assert nearest_bucket((1920, 1080), buckets)[0] > nearest_bucket((1920, 1080), buckets)[1]
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert fit(Image.new("RGB", (1920, 1080)), (640, 384)).size == (640, 384)


def test_batch_order_is_a_function_of_seed_and_step(tmp_path):
    for i, size in enumerate([(32, 32)] * 5 + [(64, 32)] * 3):
        _img(tmp_path / f"{i}.png", size)
    ds = scan(tmp_path)
    plan = BatchPlan(ds, bucket_sizes(32, 8), 32, batch=2, seed=3)
    run = [plan[k] for k in range(3 * plan.per_epoch)]
    again = BatchPlan(ds, bucket_sizes(32, 8), 32, batch=2, seed=3)
    assert [again[k] for k in reversed(range(len(run)))] == run[::-1]  # random access, same answers
    for k in range(len(run)):  # never mixes buckets in one batch
        assert len({plan.bucket_of[i] for i in run[k]}) == 1
    epoch = sorted(i for b in run[: plan.per_epoch] for i in b)
    assert epoch == list(range(8))  # every image once per epoch
    assert run[: plan.per_epoch] != run[plan.per_epoch: 2 * plan.per_epoch]  # reshuffled per epoch
    assert BatchPlan(ds, None, 32, 2, seed=4)[0] != plan[0] or BatchPlan(ds, None, 32, 2, seed=4)[1] != plan[1]


def test_regularisation_images_are_flagged_and_named_in_errors(tmp_path):
    from t2i.train.data import merge

    (tmp_path / "style").mkdir()
    (tmp_path / "reg").mkdir()
    _img(tmp_path / "style" / "a.png")
    _img(tmp_path / "reg" / "b.png")
    (tmp_path / "reg" / "b.txt").write_text("a red circle")
    ds = merge(scan(tmp_path / "style"), scan(tmp_path / "reg", reg=True))
    assert [(it.path.name, it.reg) for it in ds.items] == [("a.png", False), ("b.png", True)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="--reg-data .* holds no usable images"):
        scan(tmp_path / "empty", reg=True)
