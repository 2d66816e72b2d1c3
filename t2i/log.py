"""t2i's notices (an input resized, a VAE decoded again in fp32, a model hash that differs) go through `logging`.

Library modules log to their own logger under `t2i` (`logging.getLogger(__name__)`), at WARNING, so the
application decides where notices go. Where nothing is set up, Python's last-resort handler prints them
on stderr; the CLI shows them there as `note: ...` lines (`notices_on_stderr`).
"""

from __future__ import annotations

import contextlib
import logging
import sys

logger = logging.getLogger("t2i")


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (a redirect, a test's capture)."""

    def __init__(self):
        logging.Handler.__init__(self)  # not StreamHandler's: it would fix the stream now

    @property
    def stream(self):
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        """One line above any progress bar on stderr (tqdm.write clears the bar, writes, redraws it)."""
        from tqdm import tqdm  # deferred: only a notice needs it

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's rule: a notice never breaks the run
            self.handleError(record)


@contextlib.contextmanager
def notices_on_stderr():
    """For the block, each t2i notice is one line `note: ...` on stderr, and only there (not also through a
    root handler that some other library may have set up)."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
