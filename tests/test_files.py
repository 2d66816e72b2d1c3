"""t2i.files: the one atomic write, as the PNG writer, the LoRA writer and the hash cache use it."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile

import pytest
from PIL import Image

from t2i import metadata
from t2i.errors import StorageError
from t2i.files import atomic_write, file_sha256
from t2i.output import write_png
from t2i.settings import Settings


def test_a_png_is_written_byte_for_byte_as_pil_writes_it_and_never_over_another(tmp_path):
    image, settings = Image.new("RGB", (16, 8), (200, 30, 60)), Settings(prompt="a red circle", seed=3)
    path = tmp_path / "x.png"
    assert write_png(image, settings, path)
    expected = io.BytesIO()
    image.save(expected, format="PNG", pnginfo=metadata.png_info(settings))
    assert path.read_bytes() == expected.getvalue()
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not the temporary file's 0600
    assert not write_png(Image.new("RGB", (16, 8)), settings, path)  # the name is taken: nothing written
    assert path.read_bytes() == expected.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left


def test_no_room_even_for_the_temporary_file_is_one_storage_error(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(StorageError, match="No space left on device; nothing was written"):
        with atomic_write(tmp_path / "a.txt") as tmp:
            tmp.write_text("never")
    assert list(tmp_path.iterdir()) == []


def test_the_hash_cache_is_written_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "w.bin"
    data.write_bytes(b"weights")
    first = file_sha256(data)
    assert file_sha256(data) == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["hashes.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
