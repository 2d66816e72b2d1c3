"""t2i's pipeline objects (installed as `t2i.pipelines`): glue over diffusers."""

from .base import BasePipeline, Result
from .image2image import Image2Image
from .inpaint import Inpaint
from .text2image import Text2Image

__all__ = ["BasePipeline", "Image2Image", "Inpaint", "Result", "Text2Image"]
