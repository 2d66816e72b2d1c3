"""The demo stages' data: batches of shapes-world scenes, a pure function of the step (so a resumed stage sees
what a straight one would), rendered on demand or ahead by worker processes; and the held-out scenes."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from t2i.demo.shapes import BACKGROUNDS, SceneMix, render, sample_scene
from t2i.train.demo.config import DemoConfig

VAL_SEED = 10**9  # held-out scenes (for PSNR and sample grids) start here


def scene_batch(first_seed: int, n: int, layout_cells: int = 0, mix: SceneMix = SceneMix()):
    """Scenes first_seed .. first_seed+n-1 as a (n, 3, 64, 64) tensor in [-1, 1] and their captions; with
    `layout_cells`, also their layout pictures (n, 4, cells, cells): per cell, the share of its pixels that
    are objects and their mean colour times that share (0..1). Backgrounds are left out: one caption in four
    names them, and they are most of the pixels (as a difference to the background, the objects' colours
    would flip sign with it and average out over the captions that don't name it); and which captions fix
    the layout, (n,) bool: a position or a relation. Only those are worth drawing: where a caption leaves the
    places free, the picture is noise to the text."""
    scenes = [sample_scene(first_seed + i, mix=mix) for i in range(n)]
    arr = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])  # (n, 64, 64, 3)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 3, 64, 64)
    if not layout_cells:
        return images, [s.caption for s in scenes]
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1.0  # (n, 3)
    fg = ((images - bg[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (n, 1, 64, 64)
    layout = F.adaptive_avg_pool2d(torch.cat([fg, fg * (images + 1) / 2], dim=1), layout_cells)
    fixed = torch.tensor([s.position is not None or s.relation is not None for s in scenes])
    return images, [s.caption for s in scenes], (layout, fixed)


def batch_seed(seed: int, stage_offset: int, step: int, batch: int, rank: int, world: int) -> int:
    """The first scene seed of a process's batch at `step`: the data position is a pure function of it."""
    return seed * 10**8 + stage_offset + (step * world + rank) * batch


class _StepScenes(torch.utils.data.Dataset):
    """Item i: the scenes of step start + i for one process (scene_batch of its batch_seed)."""

    def __init__(self, seed: int, stage_offset: int, start: int, stop: int, batch: int, rank: int, world: int,
                 cells: int, mix: SceneMix):
        self.seed, self.offset, self.start, self.stop = seed, stage_offset, start, stop
        self.batch, self.rank, self.world, self.cells, self.mix = batch, rank, world, cells, mix

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int):
        first = batch_seed(self.seed, self.offset, self.start + i, self.batch, self.rank, self.world)
        return scene_batch(first, self.batch, self.cells, self.mix)


def _as_is(item):
    return item


def step_scenes(cfg: DemoConfig, acc, stage_offset: int, start: int, stop: int, batch: int, cells: int = 0):
    """The scenes of steps start..stop-1, in order (see scene_batch): rendered on demand, or ahead by
    cfg.data_workers processes (a torch DataLoader; the same batches either way)."""
    data = _StepScenes(cfg.seed, stage_offset, start, stop, batch, acc.process_index, acc.num_processes, cells,
                       cfg.scenes)
    if cfg.data_workers <= 0:
        return (data[i] for i in range(len(data)))
    # its own generator: the workers' seeds must not come from the global RNG, which the steps' noise draws on
    return iter(torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_as_is, num_workers=cfg.data_workers,
                                            prefetch_factor=8, generator=torch.Generator().manual_seed(0)))


@lru_cache(maxsize=4)
def held_out_renders(n: int = 256) -> torch.Tensor:
    """The first `n` held-out scenes (VAL_SEED on) as (n, 3, 64, 64) in [-1, 1]; rendered once per process
    (shared: read it, never write to it)."""
    return scene_batch(VAL_SEED, n)[0]
