"""Start-up savings of the `t2i` process: imports it never uses put off, no garbage collections while
millions of long-lived objects are made."""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import sys
import types


class _Deferred(types.ModuleType):
    """A module that stands in sys.modules until something reads from it.

    Its name, file and spec are set, so tools that walk sys.modules (inspect,
    torch's op registration) see a module without loading it; any other
    attribute imports the real one and takes over its namespace.
    """

    def __getattr__(self, attr: str):
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Put off importing `name` until it is used: every diffusers scheduler module imports
    scipy.stats (about 1 s of a 10 s `t2i generate`) for beta sigmas, which t2i never asks for."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return
    if spec is None:
        return
    module = _Deferred(name)
    module.__spec__, module.__file__ = spec, spec.origin
    module.__path__ = list(spec.submodule_search_locations or [])
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


@contextlib.contextmanager
def no_collections():
    """Imports and model loading make millions of objects that live as long as the process;
    full garbage collections over them while they are made cost 2 s of a 10 s `t2i generate`."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
