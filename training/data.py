"""Training data for the photo families: images read through the pipeline's readers, the
held-out split, and an endless stream of random crops.

The split is by key: a photo whose key's CRC32 is divisible by `holdout_every` (10) is never
trained on (`is_holdout`), so every run, benchmark and script agrees on it without a list.
"""
from __future__ import annotations

import os
import zlib
from typing import Iterator, List, Optional

import numpy as np

HOLDOUT_EVERY = 10


def is_holdout(key: str, every: int) -> bool:
    return every > 0 and zlib.crc32(key.encode()) % every == 0


def padded_batch(image: np.ndarray, stride: int = 16) -> np.ndarray:
    """One (H, W, C) image as a batch of one, edge-padded as the pipeline pads it for the model."""
    from families.spatial.transforms import pad_to_multiple

    return pad_to_multiple(image[None], stride)


def holdout_files(folder: str, every: int = HOLDOUT_EVERY, ext: str = ".jpg") -> list:
    """The files of a folder of photos that training holds out (by the key, the name without
    extension): what the photo benchmarks evaluate on."""
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.endswith(ext) and is_holdout(n[:-len(ext)], every)]


def photos(pattern: str, input_format: str, rng, holdout: Optional[bool], every: int) -> Iterator[tuple]:
    """(key, uint8 RGB image) for each readable image, shards in random order; holdout None = all."""
    from pipeline.errors import BadImage
    from pipeline.formats import get_reader
    from pipeline.images import decode_photo

    reader = get_reader(input_format)
    shards, root = reader.match(pattern)
    for i in rng.permutation(len(shards)) if rng is not None else range(len(shards)):
        for rec in reader.records(shards[i], root):
            if rec.error is not None or (holdout is not None and is_holdout(rec.key, every) != holdout):
                continue
            try:
                if rec.pixels is not None:
                    image = np.asarray(rec.pixels, np.uint8)
                    image = image[..., None] if image.ndim == 2 else image
                else:
                    image = decode_photo(rec.encoded).pixels
            except (BadImage, ValueError):
                continue
            yield rec.key, (np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3])


def random_crops(pattern: str, input_format: str, config, seed: int) -> Iterator[np.ndarray]:
    """An endless stream of float32 [crop, crop, 3] training crops (random position and flip),
    mixed through a shuffle buffer; never holds more than the buffer in memory."""
    rng = np.random.default_rng(seed)
    buffer: List[np.ndarray] = []
    size = config.crop
    while True:
        found = False
        for _, image in photos(pattern, input_format, rng, False, config.holdout_every):
            found = True
            if image.shape[0] < size or image.shape[1] < size:
                image = np.pad(image, ((0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])),
                                       (0, 0)), mode="reflect" if min(image.shape[:2]) > 1 else "edge")
            # An image no larger than the crop (CIFAR-10's 32x32 at crop 32) gives one crop, not copies.
            same = image.shape[0] == size and image.shape[1] == size
            for _ in range(1 if same else config.crops_per_image):
                y = rng.integers(0, image.shape[0] - size + 1)
                x = rng.integers(0, image.shape[1] - size + 1)
                crop = image[y:y + size, x:x + size]
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                buffer.append(crop)
            while len(buffer) >= 256:
                yield buffer.pop(rng.integers(len(buffer))).astype(np.float32) / 255.0
        if not found:
            raise ValueError(f"no training images in {pattern!r} outside the held-out split")


def load_holdout(pattern: str, input_format: str, config,
                 validation: Optional[str] = None) -> List[np.ndarray]:
    """The validation photos: the first `val_images` held-out ones of --input, or with a
    `validation` pattern (a held-out set of one's own) up to `val_images` of those, spread evenly
    over them in key order (so that every kind of photo in it is seen)."""
    if validation is None:
        images = []
        for _, image in photos(pattern, input_format, None, True, config.holdout_every):
            images.append(image)
            if len(images) >= config.val_images:
                break
        return images
    found = sorted(photos(validation, input_format, None, None, 0), key=lambda item: item[0])
    if len(found) > config.val_images:
        found = [found[i] for i in np.linspace(0, len(found) - 1, config.val_images).round().astype(int)]
    return [image for _, image in found]
