"""t2i: text-to-image latent diffusion on diffusers.

    from t2i.pipelines import Text2Image
    pipe = Text2Image.from_pretrained()          # the bundled demo model
    result = pipe("a red circle", seed=1)
    result.images[0].save("circle.png")

Command line: `t2i generate "a red circle"`; see `t2i --help`.
"""

import os as _os

# Library chatter a user cannot act on (advisories about optional backends,
# "ignored config attributes") stays off unless the user asks for it.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

from t2i.errors import ModelLoadError, NumericalError, T2IError, UnsafeFileError, UsageError  # noqa: E402

__all__ = ["__version__", "T2IError", "UsageError", "ModelLoadError", "UnsafeFileError", "NumericalError"]
