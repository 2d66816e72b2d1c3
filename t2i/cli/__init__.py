"""The `t2i` command: a thin shell over the Python API, one module per command.

Each command module has `add_parser(sub)` (its arguments, nothing imported that
`--help` does not need) and a `cmd_*` function that checks the arguments before
any model loads, calls the Python API and prints: written paths on stdout,
progress and notices on stderr. A `T2IError` becomes one line `t2i: error: ...`
and exit code 2 (`--debug` or T2I_DEBUG=1 shows the traceback).
"""

from t2i.cli.main import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
