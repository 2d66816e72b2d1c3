"""t2i's pipeline objects (installed as `t2i.pipelines`): glue over diffusers."""

from t2i.pipelines.base import BasePipeline, Result
from t2i.pipelines.image2image import Image2Image
from t2i.pipelines.inpaint import Inpaint
from t2i.pipelines.text2image import Text2Image

__all__ = ["BasePipeline", "Image2Image", "Inpaint", "Result", "Text2Image"]
