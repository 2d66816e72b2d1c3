"""The exceptions t2i raises on purpose.

Every one carries a one-line message that says what was wrong and what to do.
The CLI prints it as `t2i: error: ...` and exits with code 2, no traceback.
"""

import difflib


class T2IError(Exception):
    """Base class: a problem the user can fix from the message alone."""


class UsageError(T2IError, ValueError):
    """Bad arguments or settings (sizes, steps, paths, names)."""


class ModelLoadError(T2IError):
    """A model, VAE or LoRA could not be found or loaded."""


class UnsafeFileError(ModelLoadError):
    """A pickle-based file was refused (pass allow_pickle / --allow-pickle to trust it)."""


class StorageError(T2IError):
    """A file could not be written or read back (disk full, permissions, a damaged checkpoint)."""


class NumericalError(T2IError):
    """NaN or inf that survived the higher-precision retry."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its class name): a library's error, fit for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def causes(e: BaseException):
    """The exception and each one it was raised from or during, oldest last."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def did_you_mean(word: str, names) -> str:
    """"did you mean 'x'?" naming the names closest to a mistyped one (difflib), or "" when none is close.

    `names` may be a dict from spellings to what to suggest (e.g. folded sampler names to t2i's names).
    """
    names = names if isinstance(names, dict) else {str(n): str(n) for n in names}
    close = dict.fromkeys(names[k] for k in difflib.get_close_matches(word, names, n=3, cutoff=0.6))
    return f"did you mean {' or '.join(map(repr, close))}?" if close else ""
