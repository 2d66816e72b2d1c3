"""The settings of a textual-inversion run (`t2i train embedding`, `EmbeddingTrainConfig`): one set of defaults.

Kept apart from the trainer (no torch import), so the CLI's help reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbeddingTrainConfig:
    model: str = ""  # "" = the bundled t2i-shapes
    data: str = ""
    output: str = ""
    token: str = ""  # the embedding's name: the word that calls it in a prompt, and its file's stem
    init_words: str = "*"  # the vectors start as these words' token embeddings (A1111's "initialization text")
    vectors: int = 1  # vectors per token (A1111's "number of vectors per token")
    # chosen by measurement on the bundled model's pastel data (docs/benchmarks.md): A1111's 5e-3 for 300 steps
    # moved paleness 47% of the way, 2e-2 for 500 steps 60% (86% of the VAE's ceiling)
    steps: int = 500
    lr: float = 2e-2
    batch: int = 8
    resolution: int = 0  # 0 = the model's native size
    buckets: bool = True
    mixed_precision: str = "no"  # no | fp16 | bf16
    min_snr_gamma: float = 5.0  # 0 = plain MSE
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    max_minutes: float = 0.0  # stop at the next checkpoint after this many minutes (0 = no limit)
    allow_pickle: bool = False
