"""Names the server knows: checkpoints, LoRAs and embeddings, each listed from its folder.

A request chooses by name only. A name is looked up in the listing; nothing a
request sends is ever joined to a path, so no request reaches another file.
Listings are made at start and on the refresh routes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from t2i.server import engine


@dataclass(frozen=True)
class Checkpoint:
    name: str  # what A1111 calls model_name
    location: str | None  # what the pipelines load (None: the bundled model)
    filename: str  # shown to clients: the name within its folder, never an absolute path
    hash: str | None = None  # A1111's short hash, once known

    @property
    def title(self) -> str:
        return f"{self.filename} [{self.hash}]" if self.hash else self.filename


def _is_model(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return path.is_file() and path.suffix.lower() == ".safetensors"  # never a pickle (.ckpt)


class Registry:
    """Checkpoints (the --model, the bundled one, and those in --model-dir), LoRAs (--lora-dir) and
    embeddings (--embedding-dir), by name."""

    def __init__(self, model: str | None = None, model_dir: Path | None = None, lora_dir: Path | None = None,
                 embedding_dir: Path | None = None):
        self.model = model
        self.model_dir, self.lora_dir, self.embedding_dir = model_dir, lora_dir, embedding_dir
        self._lock = threading.Lock()
        self.checkpoints: dict[str, Checkpoint] = {}
        self.loras: dict[str, Path] = {}
        self.embeddings: dict[str, Path] = {}
        self.hashes: dict[str, str] = {}  # name -> short hash, filled as models load
        self.default = ""
        self.refresh_checkpoints()
        self.refresh_loras()
        self.refresh_embeddings()

    # ------------------------------------------------------------------ checkpoints

    def refresh_checkpoints(self) -> None:
        found: dict[str, Checkpoint] = {}
        bundled = engine.bundled_name()
        try:
            engine.resolve_model(None)
            found[bundled] = Checkpoint(bundled, None, bundled)
        except engine.T2IError:
            pass  # an install without the demo model
        if self.model:
            source = engine.resolve_model(self.model)
            filename = Path(source.location).name if source.kind != "hub" else source.location
            found[source.name] = Checkpoint(source.name, self.model, filename)
        if self.model_dir is not None and self.model_dir.is_dir():
            for path in sorted(self.model_dir.iterdir()):
                if not path.name.startswith(".") and _is_model(path):
                    name = path.stem if path.is_file() else path.name
                    found.setdefault(name, Checkpoint(name, str(path), path.name))
        with self._lock:
            self.checkpoints = {n: Checkpoint(c.name, c.location, c.filename, self.hashes.get(n))
                                for n, c in found.items()}
            if not self.default:
                self.default = engine.resolve_model(self.model).name if self.model else bundled

    def note_hash(self, name: str, short_hash: str) -> None:
        with self._lock:
            self.hashes[name] = short_hash[:10]
            c = self.checkpoints.get(name)
            if c is not None:
                self.checkpoints[name] = Checkpoint(c.name, c.location, c.filename, short_hash[:10])

    def find_checkpoint(self, text: str) -> Checkpoint | None:
        """A checkpoint by any name A1111 accepts: title, model_name, file name, or short hash."""
        if not isinstance(text, str) or not text:
            return None
        with self._lock:
            for c in self.checkpoints.values():
                if text in (c.title, c.name, c.filename, c.hash) or text.split(" [")[0] in (c.name, c.filename):
                    return c
        return None

    # ------------------------------------------------------------------ LoRAs and embeddings

    @staticmethod
    def _safetensors_in(folder: Path | None) -> dict[str, Path]:
        if folder is None or not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.iterdir())
                if p.is_file() and p.suffix.lower() == ".safetensors" and not p.name.startswith(".")}

    def refresh_loras(self) -> None:
        self.loras = self._safetensors_in(self.lora_dir)

    def refresh_embeddings(self) -> None:
        self.embeddings = self._safetensors_in(self.embedding_dir)

    def embedding_shape(self, name: str) -> tuple[int, int]:
        """(vectors, width) of an embedding file from its header alone; (0, 0) if it cannot be read."""
        try:
            header = engine.safetensors_header(self.embeddings[name])
        except (engine.T2IError, OSError):
            return 0, 0
        shapes = {k: v.get("shape") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        if all(shapes.get(k) for k in ("clip_l", "clip_g")):  # SDXL: A1111 gives the two widths' sum
            l, g = shapes["clip_l"], shapes["clip_g"]
            return (l[0] if len(l) > 1 else 1), l[-1] + g[-1]
        for shape in shapes.values():
            if shape:
                return (shape[0] if len(shape) > 1 else 1), shape[-1]
        return 0, 0
