"""Atomic, resumable training checkpoints.

A checkpoint is a folder `step-00001200/` holding safetensors weights, the
optimizer and LR-schedule state, the RNG states and a `state.json` written
last. It is first written under a hidden temporary name, flushed to disk, and
only then renamed into place, so a crash or a full disk mid-write never leaves
a folder that `latest()` would pick up. Older checkpoints are pruned only after
the new one is complete.

Nothing here unpickles arbitrary objects: tensors go through safetensors, the
optimizer state through `torch.load(weights_only=True)`, everything else
through JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from t2i.errors import StorageError, T2IError, UsageError, first_line

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """The checkpoints of one run, in `root`; keeps the newest `keep` of them and those of the steps in `pinned`."""

    def __init__(self, root: str | Path, keep: int = 2, pinned: tuple[int, ...] = ()):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.pinned = set(pinned)

    def all(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1][1] if found else None

    def resolve(self, resume: str | None) -> Path | None:
        """'latest' -> newest complete checkpoint (or None); a path -> that checkpoint."""
        if not resume:
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UsageError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); use 'latest'")
        return path

    def save(self, step: int, write: Callable[[Path], dict[str, Any]]) -> Path:
        """Write a checkpoint atomically. `write(folder)` fills the folder and returns the state dict."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        if (final / STATE_FILE).is_file():
            return final  # this step is already saved, completely
        previous = self.latest()
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            state = write(tmp)
            state = {"step": step, **state}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks completeness
            _fsync_tree(tmp)
            if final.exists():  # an incomplete leftover with the final name
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, SafetensorError)):  # disk full, quota, permissions: say so, keep the rest
                kept = (f"the previous checkpoint ({previous.name}) is intact; once that is fixed, --resume latest "
                        "continues from it") if previous else "no earlier checkpoint exists"
                raise StorageError(f"could not write checkpoint step {step} in {self.root}: "
                                   f"{getattr(e, 'strerror', None) or e}; {kept}") from None
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        for step, path in self.all()[: -self.keep]:
            if step in self.pinned:
                continue
            (path / STATE_FILE).unlink(missing_ok=True)  # first: a kill mid-delete leaves a folder no one picks
            shutil.rmtree(path, ignore_errors=True)
        for p in self.root.iterdir():  # such leftovers (complete folders only ever appear by a rename)
            if _STEP_DIR.match(p.name) and not (p / STATE_FILE).is_file():
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-step-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- state pieces


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as JSON-able data plus tensors."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_training_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write weights (safetensors), optimizer/scheduler state and RNG; return JSON-able extras."""
    for name, module in modules.items():
        sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(sd, str(folder / f"{name}.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if lr_scheduler is not None:
        torch.save(lr_scheduler.state_dict(), folder / "lr_scheduler.pt")
    rng = rng_state()
    save_file({"torch_rng": rng["torch"], **(tensors or {})}, str(folder / "rng_and_tensors.safetensors"))
    return {"rng": {"python": rng["python"], "numpy": rng["numpy"]}}


@dataclass
class SavedState:
    """A checkpoint read from disk and vetted, not yet applied to a model (see read_training_state)."""

    folder: Path
    state: dict[str, Any]  # state.json
    modules: dict[str, dict[str, torch.Tensor]]
    optimizer: dict[str, Any] | None
    lr_scheduler: dict[str, Any] | None
    tensors: dict[str, torch.Tensor]  # the extra tensors given to save_training_state
    torch_rng: torch.Tensor

    def restore(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None = None,
                lr_scheduler: Any = None) -> None:
        """Load the weights, optimizer and schedule state, and the RNG states; a mismatch is one StorageError."""
        current = STATE_FILE
        try:
            for name, module in modules.items():
                current = f"{name}.safetensors"
                module.load_state_dict(self.modules[name])
            for obj, sd, file in ((optimizer, self.optimizer, "optimizer.pt"),
                                  (lr_scheduler, self.lr_scheduler, "lr_scheduler.pt")):
                if obj is not None:
                    current = file
                    obj.load_state_dict(sd)
            current = STATE_FILE
            set_rng_state({**self.state["rng"], "torch": self.torch_rng})
        except Exception as e:  # noqa: BLE001 - a checkpoint that does not fit this run, whatever the reason
            raise StorageError(f"checkpoint {self.folder} cannot be resumed: {current} does not fit this run "
                               f"({type(e).__name__}: {first_line(e)}); resume from another with --resume PATH"
                               ) from None


def read_training_state(folder: Path, modules: Sequence[str] = (), optimizer: bool = True,
                        lr_scheduler: bool = True) -> SavedState:
    """Read and vet every file of a checkpoint without touching a model (cheap: run it before a model loads).

    Weights are safetensors (headers vetted first); optimizer and scheduler state are read
    with `torch.load(weights_only=True)`, which refuses code. A damaged or hostile file is
    a one-line StorageError naming it, never a traceback.
    """
    from t2i.files import check_weight_file

    folder = Path(folder)
    current = folder / STATE_FILE
    try:
        state = json.loads(current.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
            raise ValueError("no step or RNG state")
        weights = {}
        for name in modules:
            current = folder / f"{name}.safetensors"
            check_weight_file(current, allow_pickle=False)
            weights[name] = load_file(str(current))
        pickled = {}
        for wanted, file in ((optimizer, "optimizer.pt"), (lr_scheduler, "lr_scheduler.pt")):
            if wanted:
                current = folder / file
                pickled[file] = _load_weights_only(current)
        current = folder / "rng_and_tensors.safetensors"
        check_weight_file(current, allow_pickle=False)
        tensors = load_file(str(current))
        torch_rng = tensors.pop("torch_rng")
    except T2IError as e:
        raise StorageError(f"checkpoint {folder} cannot be resumed: {e}") from None
    except FileNotFoundError:
        raise StorageError(f"checkpoint {folder} cannot be resumed: {current.name} is missing; "
                           "resume from another with --resume PATH") from None
    except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint file means the same to the user
        raise StorageError(f"checkpoint {folder} cannot be resumed: {current.name} is damaged "
                           f"({type(e).__name__}: {first_line(e)[:200]}); resume from another with --resume PATH"
                           ) from None
    return SavedState(folder, state, weights, pickled.get("optimizer.pt"), pickled.get("lr_scheduler.pt"), tensors,
                      torch_rng)


def _load_weights_only(path: Path) -> Any:
    """torch.load(weights_only=True); a file holding anything but tensors and plain data is refused (no code runs)."""
    with warnings.catch_warnings():  # torch's note on an unusual pickle protocol: the error says it
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise
    raise StorageError(f"{path.name} holds objects other than tensors, so it is hostile or not a t2i checkpoint "
                       "(read with weights_only=True: no code ran)")


def load_training_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore what save_training_state wrote; return (state.json, extra tensors).

    read_training_state, then SavedState.restore: a damaged, hostile or mismatched
    checkpoint is a one-line StorageError.
    """
    saved = read_training_state(folder, list(modules), optimizer is not None, lr_scheduler is not None)
    saved.restore(modules, optimizer, lr_scheduler)
    return saved.state, saved.tensors


