"""The server's own error: a bad `t2i serve` argument (one line, exit code 2, before any model loads)."""

from __future__ import annotations

from t2i.server.engine import UsageError


class ConfigError(UsageError):
    """A `t2i serve` argument that cannot work (checked before anything loads)."""
