"""The settings of a photo model and its training (any photo family), stored in codec.json."""
from __future__ import annotations

import dataclasses
from typing import Optional

from families.spatial.transforms import KERNEL_STORAGE

# --quality 1..8 -> lambda, as CompressAI's bmshj2018-factorized presets.
QUALITY_LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}


@dataclasses.dataclass
class PhotoConfig:
    """Every setting that shapes a photo model (any photo family) and its training; stored in codec.json."""

    filters: int = 64  # N: channels of the hidden layers
    latent_channels: int = 96  # M: channels of the latent tensor
    lmbda: float = QUALITY_LAMBDAS[4]
    quality: Optional[int] = None
    crop: int = 128
    batch_size: int = 8
    steps: int = 50000
    learning_rate: float = 3e-4
    clip_norm: float = 1.0
    crops_per_image: int = 4
    checkpoint_every: int = 500
    validate_every: int = 2500
    val_images: int = 24
    holdout_every: int = 10  # keys with crc32(key) % holdout_every == 0 are never trained on
    seed: int = 0
    family: str = "spatial"  # the model family trained (families/<family>/train.py)
    stride: int = 16  # 16: four stride-2 stages (photos); 8: three, for very small images (CIFAR-10)
    kernel_storage: str = KERNEL_STORAGE  # how the exported SavedModel stores kernels (`stored_kernel`)
    warmup_steps: int = 0  # the first steps train the entropy model alone, on fixed transforms (`rate`)
    minutes: Optional[float] = None  # a wall-clock budget: steps re-planned from the measured rate
    export_anyway: bool = False  # a fit from a model that does not beat it on held-out images still exports
    slices: int = 4  # channelwise: latent slices coded in sequence
    context_filters: int = 96  # channelwise: channels of each slice's context network
