"""Small assertions the test modules share."""

from __future__ import annotations

import numpy as np


def pixels(image) -> np.ndarray:
    """An image as an int16 array (H, W, 3), so differences do not wrap around."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def one_line(err: str) -> str:
    """The single line of an error message; fails on several lines or a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]
