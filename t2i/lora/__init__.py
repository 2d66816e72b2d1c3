"""LoRA files: their layouts and conversion (`format`), and applying them to a pipeline (`apply`)."""

from t2i.lora.apply import LoraSet, lora_hash, parse_lora_arg
from t2i.lora.format import (
    FORMATS,
    convert_lora,
    detect_layout,
    lora_info,
    read_lora,
    save_lora,
    to_diffusers,
    to_kohya,
)

__all__ = ["FORMATS", "LoraSet", "convert_lora", "detect_layout", "lora_hash", "lora_info", "parse_lora_arg",
           "read_lora", "save_lora", "to_diffusers", "to_kohya"]
