"""Safe file handling: what may be read, how files are hashed, and how they are written.

- Weights: safetensors only by default. A pickle-based file (.ckpt/.bin/.pt, or any
  file that opens like a pickle or a torch zip) is refused unless the caller allows
  pickles, and then read with `torch.load(weights_only=True)`: tensors, never code.
- Hashes: sha256 of files, cached by path, size and mtime (A1111's model and LoRA
  hashes are prefixes of them).
- Writes: `atomic_write` puts a file in place whole or not at all, so a crash or a full
  disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import torch

from t2i.errors import ModelLoadError, StorageError, UnsafeFileError, first_line


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")


WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def is_pickle_file(path: str | Path) -> bool:
    """True for torch/pickle files, whatever they are named: a zip archive or a pickle stream."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (holds a pickle)
        return True
    # Pickle protocols 2-5 open with PROTO; older ones fail the safetensors header check instead.
    return len(head) >= 2 and head[0] == 0x80 and head[1] in range(2, 6)


_SIGNATURES = {  # how other files begin: what a broken .safetensors really is, and what to do
    b"\x89PNG\r\n\x1a\n": ("a PNG image", ""),
    b"\xff\xd8\xff": ("a JPEG image", ""),
    b"GIF8": ("a GIF image", ""),
    b"%PDF-": ("a PDF document", ""),
    b"\x1f\x8b": ("a gzip archive", "; unpack it first"),
    b"7z\xbc\xaf\x27\x1c": ("a 7-Zip archive", "; unpack it first"),
    b"Rar!\x1a\x07": ("a RAR archive", "; unpack it first"),
}
_SAVED_IN_PLACE = "; download the file itself"


def what_file(lead: bytes) -> str | None:
    """What a file that is not safetensors is, from its first bytes ("a PNG image; ..."), or None if unknown."""
    for magic, (what, advice) in _SIGNATURES.items():
        if lead.startswith(magic):
            return what + advice
    if lead[:4] == b"RIFF" and lead[8:12] == b"WEBP":
        return "a WebP image"
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(lead)  # a cut last character is fine
    if "\ufffd" in text or not text.strip() or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return None
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a sign-in or error page saved in its place?)" + _SAVED_IN_PLACE
    first = text.strip().splitlines()[0][:60]
    return f"a text file (it begins {first!r}: an error message saved in its place?)" + _SAVED_IN_PLACE


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header without loading tensors; return the header.

    Refuses pickles with a .safetensors name, Git LFS pointers, other kinds of file (an image, an HTML
    page, a text, an archive: named in the error), truncated files and headers that claim more data than
    the file has.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        lead = f.read(256)  # enough to recognise a Git LFS pointer or a text, which 8 bytes are not
        head = lead[:8]
        f.seek(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is not a safetensors file (only {size} bytes)")
        if lead.startswith(b"version https://git-lfs"):
            raise ModelLoadError(f"{path} is a Git LFS pointer, not the weights; run `git lfs pull` or download the real file")
        if is_pickle_file(path):
            raise UnsafeFileError(f"{path} is a pickle file named .safetensors; refused (pickles can run code)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            what = what_file(lead)
            if what:
                raise ModelLoadError(f"{path} is not a valid safetensors file: it is {what}")
            raise ModelLoadError(f"{path} is not a valid safetensors file (truncated or bad header); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{path} is not a valid safetensors file (unreadable header); download it again") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file (bad header)")
    end = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path} is not a valid safetensors file (bad entry {key!r})") from None
        if not (0 <= lo <= hi) or end + hi > size:
            raise ModelLoadError(f"{path} is truncated (tensor {key!r} runs past the end of the file); download it again")
    return header


def check_weight_file(path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse what could run code, and broken files, before any loader sees them."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
        return
    if path.suffix.lower() in PICKLE_SUFFIXES or is_pickle_file(path):
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path} is a pickle-based file ({path.suffix or 'no suffix'}), which can run code when loaded; "
                "use a .safetensors file, or pass --allow-pickle if you trust its source"
            )
        return
    raise ModelLoadError(f"{path} is not a weights file t2i knows (.safetensors, or .ckpt/.bin/.pt with --allow-pickle)")


def load_pickled_weights(path: Path) -> dict:
    """A pickle-based weights file (only when pickles are allowed), read with torch.load(weights_only=True):
    tensors and plain containers only, never code. Anything else is a one-line ModelLoadError."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is one message
        what = "objects other than tensors" if "weights only" in str(e).lower() else first_line(e)
        raise ModelLoadError(f"could not read {path}: it holds {what} (read with weights_only=True, "
                             "so no code ran); use a .safetensors file") from None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"could not read {path}: it holds a {type(sd).__name__}, not a dict of tensors")
    return sd


def _cache_file() -> Path:
    return Path(os.environ.get("T2I_CACHE", Path.home() / ".cache" / "t2i")) / "hashes.json"


def file_sha256(path: str | Path, skip_safetensors_header: bool = False) -> str:
    """sha256 of a file (cached by path, size and mtime); optionally of its tensor data only."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{int(skip_safetensors_header)}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as tmp:
            tmp.write_text(json.dumps(known))
    except (OSError, StorageError):
        pass  # a read-only home only costs a re-hash next time
    return digest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_usual_mode(path: str | Path) -> None:
    """Give a file t2i wrote the mode a new file gets under the user's umask (0o666 & ~umask).

    Temporary files (mkstemp) and safetensors >= 0.8 files (written through one, safetensors#782) are 0600: an
    image, LoRA or model would be readable only by its writer, not by a web UI running as another user.
    """
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_write(path: str | Path, overwrite: bool = True, errors: tuple[type[BaseException], ...] = ()):
    """A temporary file beside `path` to write in the block; leaving it, the file becomes `path` whole.

    With overwrite=False the file is linked in place (os.link), which raises FileExistsError when
    the name is taken: two writers never replace each other's file. The file gets the user's usual
    mode. If anything fails, the temporary file is removed and `path` is as it was; an OSError (or
    one of `errors`, e.g. a library's own I/O error) becomes one StorageError line.
    """
    path = Path(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        give_usual_mode(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise
    except (OSError, *errors) as e:  # disk full, quota, permissions
        kept = "the existing file is unchanged" if path.exists() else "nothing was written"
        raise StorageError(f"could not write {path}: {getattr(e, 'strerror', None) or e}; {kept}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
