"""Models: what a model argument names (`sources`), vetting and loading (`loading`), and a model folder's
extra parts: its small decoder (`tiny_vae`) and its autoguidance guide (`guide`).

    source = models.resolve("./my-sd15")      # cheap: nothing loaded, paths checked
    pipe, arch, path = models.load(source, torch.float32)
"""

from t2i.models.loading import check_folder, load
from t2i.models.sources import (
    BUNDLED_NAME,
    ModelSource,
    arch_of_folder,
    arch_of_keys,
    bundled_model_path,
    model_hash,
    resolve,
)

__all__ = ["BUNDLED_NAME", "ModelSource", "arch_of_folder", "arch_of_keys", "bundled_model_path", "check_folder",
           "load", "model_hash", "resolve"]
