"""t2i's pipeline objects (installed as `t2i.pipelines`): glue over diffusers."""

from .base import BasePipeline, Result
from .text2image import Text2Image

__all__ = ["BasePipeline", "Result", "Text2Image"]
