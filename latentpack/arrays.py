"""Images in memory to codes and back, through the same codec as the jobs (CompressAI's
`compress`/`decompress` shape, for a few images at a time):

    codes = latentpack.compress(images, model="photo:4")   # a list of uint8 HxWxC (or HxW) arrays
    codes.nbytes, codes.bits_per_pixel, codes.table       # the rows a dataset part would hold
    images = latentpack.decompress(codes)                   # the same model, found from the codes

A model is loaded once per process and kept (as the jobs' workers keep theirs).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import LatentpackError


@dataclasses.dataclass
class Codes:
    """Compressed images: `table` holds one row per image (key "0", "1", …, the codec's columns, as
    in a dataset part), `model` the model's folder, `fingerprint` its fingerprint."""

    table: pa.Table
    model: str
    fingerprint: str
    pixels: int

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values (codes or latents, the per-row size columns included)."""
        return sum(self.table.column(n).nbytes for n in self.table.column_names if n not in ("key", "label"))

    @property
    def bits_per_pixel(self) -> float:
        return 8.0 * self.nbytes / max(self.pixels, 1)


def _codec(model: str):
    from pipeline import models
    from pipeline.artifact import read_spec
    from pipeline.codec import shared_codec

    model_dir = models.resolve(model)
    return model_dir, shared_codec(model_dir, read_spec(model_dir))


def compress(images: Sequence[np.ndarray], model: str = "photo:4", refine: int = 0,
             latent_format: Optional[str] = None) -> Codes:
    """Compress uint8 images (H x W x C with C in 1, 3, 4, or H x W grey) with a model (a shipped
    name or an artifact folder). Images of different sizes are fine for the photo models; a dense
    model takes its one size."""
    from pipeline import latents
    from pipeline.codec import schema_of
    from pipeline.images import ImageBatch

    model_dir, codec = _codec(model)
    fmt = latent_format or codec.default_latent_format(codec.spec)
    why_not = codec.check_latent_format(codec.spec, fmt)
    if why_not:
        raise LatentpackError(why_not)
    schema = schema_of(codec.spec, fmt)
    groups = collections.defaultdict(list)
    pixels = 0
    for i, image in enumerate(images):
        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise LatentpackError(f"image {i}: uint8 pixels expected, got {a.dtype}")
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or min(a.shape[:2]) < 1:
            raise LatentpackError(f"image {i}: shape {a.shape} is not H x W x C with C in 1, 3, 4")
        pixels += a.shape[0] * a.shape[1]
        groups[a.shape].append((str(i), a))
    tables = []
    for shape, items in groups.items():
        keys = [k for k, _ in items]
        batch = ImageBatch(keys, np.stack([a for _, a in items]), np.full(len(items), -1, np.int64),
                           np.zeros(len(items), bool))
        tables.append(latents.to_table(keys, codec.compress(batch, fmt, refine), batch.labels, batch.has_label,
                                       schema))
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    order = sorted(range(table.num_rows), key=lambda r: int(table.column("key")[r].as_py()))
    return Codes(table.take(pa.array(order, pa.int64())), model_dir, codec.fingerprint, pixels)


def decompress(codes: Codes, model: Optional[str] = None) -> List[np.ndarray]:
    """The images of `codes`, in their order (uint8 H x W x C). `model`: another copy of the model
    that compressed them (its fingerprint must match)."""
    from pipeline.images import DeadLetter

    model_dir, codec = _codec(model or codes.model)
    if codec.fingerprint != codes.fingerprint:
        raise LatentpackError(f"these codes were made with model {codes.fingerprint}; {model_dir} is "
                              f"{codec.fingerprint}")
    out = {}
    for item in codec.decompress(codes.table):
        if isinstance(item, DeadLetter):
            raise LatentpackError(f"image {item.key} does not decode ({item.reason}: {item.error})")
        for key, image in zip(item.keys, item.images):
            out[key] = image
    return [out[k] for k in codes.table.column("key").to_pylist()]
