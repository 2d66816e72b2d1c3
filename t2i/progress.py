"""One progress bar on stderr over the denoising steps of a whole job (several prompts, several calls).

A pipeline call learns how many steps it runs when its first step ends (img2img runs a share of the
schedule, second-order samplers more) and adds them to the bar's total then. So the bar is drawn from its
first real total on: never an empty `0step` line first, and nothing at all from a run that stops before
its first step.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class StepBar:
    """A tqdm bar made when its total is first set; `update`, `refresh` and `total` as tqdm's."""

    def __init__(self, desc: str, leave: bool = True):
        self.desc, self.leave = desc, leave
        self._bar: tqdm | None = None

    @property
    def total(self) -> int:
        return self._bar.total if self._bar is not None else 0

    @total.setter
    def total(self, steps: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=steps, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                             leave=self.leave)
        else:
            self._bar.total = steps

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @staticmethod
    def write(text: str, file=None) -> None:
        """`text` on stdout (or `file`), never on the bar's line where both show in one terminal: the bar is
        cleared, the text written in one write (processes sharing a pipe would otherwise splice their lines),
        and the bar drawn again below it."""
        file = file or sys.stdout
        with tqdm.external_write_mode(file=file):
            file.write(text)
            file.flush()


class PlannedBar(StepBar):
    """A StepBar whose whole total is known up front from each call's expected steps (a grid's cells): a call
    that reports its real steps (second-order samplers run more) replaces its own estimate, not adds to it."""

    def __init__(self, desc: str, expected: list[int], leave: bool = True):
        super().__init__(desc, leave)
        self._expected = list(expected)

    @property
    def total(self) -> int:
        return StepBar.total.fget(self)

    @total.setter
    def total(self, steps: int) -> None:
        now = StepBar.total.fget(self)
        added = steps - now  # what the call adds (pipelines grow the total by their steps)
        estimate = self._expected.pop(0) if self._expected else 0
        StepBar.total.fset(self, (now or sum(self._expected) + estimate) - estimate + added)
