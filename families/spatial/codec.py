"""The spatial family: fully convolutional, any image size, latents [ceil(H/16), ceil(W/16), M].

Each image is edge-padded to a multiple of the stride, transformed, and its latents
coded channel by channel with the artifact's integer tables into one byte string. Rows
record `height`, `width` (exact: the decoder crops back to them), `channels` (1 for grey
sources, coded as RGB and returned as grey), `mode` (the source's pixel mode, e.g.
CMYK or I;16, before conversion to 8-bit grey or RGB) and `icc_profile` (the source's embedded
colour profile, null for none; decoded images carry it again). Large images go through the
transforms in overlapping tiles so memory stays bounded (a 24-megapixel photo fits in
well under 3 GB).
"""
from __future__ import annotations

import functools
from typing import List

import numpy as np
import pyarrow as pa

from families.spatial.transforms import apply_transform, pad_to_multiple
from pipeline.codec import ModelCodec, code_words, row_labels
from pipeline.entropy import ChannelCoder
from pipeline.errors import LatentpackError
from pipeline.images import BATCH_PIXELS, DEFAULT_MAX_PIXELS, DeadLetter, ImageBatch, ShapeGroups, profile_for

# The transforms see at most this many image pixels per call: a batch goes in groups of
# images, an image above it in tiles of TILE pixels a side, each with MARGIN pixels of
# context on every side (more than the transforms' reach, so the result matches the
# whole-image transform up to float rounding).
TILE_ABOVE = 1024 * 1024
TILE = 1024
MARGIN = 64
# The synthesis computes in float64 (pixels identical on every machine), twice float32's bytes:
# its calls take at most SYNTHESIS_PIXELS, a larger image in tiles of SYNTHESIS_TILE pixels a side.
# The synthesis of a 24-megapixel photo peaked at 2.32 GB with 1024-pixel tiles, 1.90 with 768
# (about 8% slower), 1.61 with 512 (about 24% slower): scripts/tile_study.py, BENCHMARKS.md.
SYNTHESIS_TILE = 768
SYNTHESIS_PIXELS = SYNTHESIS_TILE * SYNTHESIS_TILE
# Decoded pixels per ImageBatch (a larger photo alone): the decode job holds a few such batches
# while its writer thread encodes PNGs.
DECODE_PIXELS = BATCH_PIXELS


class SpatialCodec(ModelCodec):

    def __init__(self, model_dir, spec):
        super().__init__(model_dir, spec)
        self.stride = spec.stride
        self.coder = self.make_coder()

    def make_coder(self):
        return ChannelCoder(self.spec.entropy_model)

    def check_signatures(self):
        enc_in, enc_out, dec_in = self._signature_shapes()
        if enc_in[-1] != self.spec.channels or enc_out[-1] != self.spec.latent_channels or \
                dec_in[-1] != self.spec.latent_channels:
            raise LatentpackError(
                f"{self.model_dir}: codec.json ({self.spec.latent_channels} latent channels) does not match its "
                f"SavedModel ({enc_out[-1]} latent channels); the artifact was altered")

    @classmethod
    def fields(cls, spec, latent_format) -> List[pa.Field]:
        value = (pa.field("code", pa.binary(), nullable=False) if latent_format == "code" else
                 pa.field("latent", pa.list_(pa.int16()), nullable=False))
        return [value,
                pa.field("height", pa.int32(), nullable=False),
                pa.field("width", pa.int32(), nullable=False),
                pa.field("channels", pa.int8(), nullable=False),
                pa.field("mode", pa.string(), nullable=False),
                pa.field("icc_profile", pa.binary())]

    @classmethod
    def metadata(cls, spec):
        return dict(super().metadata(spec), stride=spec.stride, latent_channels=spec.latent_channels,
                    latent_dtype=spec.latent_dtype)

    # --- transforms ---------------------------------------------------------------------------
    def analysis(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (any H, W) -> int16 latents [N, ceil(H/s), ceil(W/s), M]."""
        padded = pad_to_multiple(images, self.stride)
        return self._in_pieces(lambda x: self._encode(images=x)["latent"].numpy(), padded,
                               padded.shape[1] * padded.shape[2], 1.0 / self.stride)

    def synthesis(self, latent: np.ndarray) -> np.ndarray:
        """int16 latents [N, h, w, M] -> uint8 [N, h*s, w*s, 3]."""
        latent = np.asarray(latent, np.int16)
        return self._in_pieces(lambda z: self._decode(latent=z)["image"].numpy(), latent,
                               latent.shape[1] * latent.shape[2] * self.stride ** 2, float(self.stride))

    def _in_pieces(self, fn, x: np.ndarray, pixels: int, scale: float) -> np.ndarray:
        """A transform over a batch, at most TILE_ABOVE image pixels per call (SYNTHESIS_PIXELS for
        the synthesis; `pixels`: each item's): same-shaped images in groups, a larger one alone in
        tiles. Memory follows the call (a batch of sixteen 1024x768 photos decoded at once peaked
        at 7.2 GB, one 1024-pixel tile at about 2.3)."""
        if len(x) == 0:
            return fn(x)
        limit = TILE_ABOVE if scale < 1 else SYNTHESIS_PIXELS
        if pixels > limit:
            return np.concatenate([self._tiled(fn, item[None], scale) for item in x])
        per_call = max(1, limit // pixels)
        return np.concatenate([fn(np.ascontiguousarray(x[i:i + per_call])) for i in range(0, len(x), per_call)])

    def _tiled(self, fn, x: np.ndarray, scale: float) -> np.ndarray:
        """Apply a transform to one [1, H, W, C] input tile by tile; `scale` = output/input size."""
        # Tile edges are multiples of the stride, so every tile sees the same grid as the whole image.
        tile, margin = (TILE, MARGIN) if scale < 1 else (SYNTHESIS_TILE // self.stride, MARGIN // self.stride)
        _, height, width, _ = x.shape
        out = None
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
                ya, xa = max(0, y0 - margin), max(0, x0 - margin)
                yb, xb = min(height, y1 + margin), min(width, x1 + margin)
                piece = fn(np.ascontiguousarray(x[:, ya:yb, xa:xb]))
                if out is None:
                    out = np.empty((1, round(height * scale), round(width * scale), piece.shape[-1]), piece.dtype)
                s = lambda v: round(v * scale)  # noqa: E731
                out[:, s(y0):s(y1), s(x0):s(x1)] = piece[:, s(y0 - ya):s(y1 - ya), s(x0 - xa):s(x1 - xa)]
        return out

    def latent_values(self, latent: np.ndarray, latent_format: str) -> list:
        """Per image of a batch of latents: its code, or (int format) its latents flattened."""
        if latent_format == "code":
            return [self.coder.encode(z) for z in latent]
        # Clipped to the tables as the codes are, so both formats hold the same latents.
        low, high = self.coder.offsets, self.coder.offsets + self.coder.sizes - 1
        return [np.clip(z, low, high).astype(np.int16).reshape(-1) for z in latent]

    def out_of_tables(self, latent: np.ndarray) -> bool:
        """Whether int-format latents hold values no code could hold (a damaged or foreign row)."""
        return bool(((latent < self.coder.offsets) | (latent >= self.coder.offsets + self.coder.sizes)).any())

    # --- encoder-side refinement (pipeline/refine.py) ------------------------------------------
    @classmethod
    def check_refine(cls, spec):
        if not isinstance((spec.training or {}).get("lmbda"), (int, float)):
            return "--refine needs a model trained with --quality or --lambda (it refines against its rate)"
        return None

    def missing_refinement(self):
        why = self.check_refine(self.spec)
        if why is None and not (hasattr(self._model, "analysis") and hasattr(self._model, "synthesis")):
            why = f"--refine needs the transforms' stored layers, which {self.model_dir}'s SavedModel does not expose"
        return why

    def rate_tables(self) -> dict:
        """The integer tables the latents are coded with ({"offsets", "frequencies", "precision"})."""
        return self.spec.entropy_model

    def latent_tables(self, latent: np.ndarray) -> np.ndarray:
        """Which of `rate_tables` codes each latent of a batch [N, h, w, M]: its channel's. (Held fixed
        while refining: those of the encoder's latents.)"""
        return np.broadcast_to(np.arange(latent.shape[-1]), latent.shape)

    @functools.cached_property
    def refiner(self):
        """The encode-time latent search, built on first use (decode jobs never need it)."""
        import tensorflow as tf

        from pipeline.refine import TransformRefiner, table_bits

        layers = self._model.analysis, self._model.synthesis
        analyze = tf.function(lambda x: apply_transform(layers[0], x, synthesis=False),
                              input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])

        def analysis(x: np.ndarray) -> np.ndarray:  # float latents, tile by tile for large images
            return self._in_pieces(lambda piece: analyze(piece).numpy(), x, x.shape[1] * x.shape[2],
                                   1.0 / self.stride)

        return TransformRefiner(analysis, lambda y: apply_transform(layers[1], y, synthesis=True),
                                table_bits(self.rate_tables()), self.spec.training["lmbda"])

    def refined(self, images: np.ndarray, latent: np.ndarray, size, steps: int) -> np.ndarray:
        """Refined latents of a batch: images uint8 [N, H, W, 3] padded to the stride, `latent` the
        encoder's, `size` the images' own (height, width). Per image, whichever of the encoder's and
        the refined latents has the lower loss as stored (the code's bytes; the distortion by the
        search's own float synthesis, which memory has room for after it) is kept."""
        pixels = size[0] * size[1]
        tables = self.latent_tables(latent)
        found = self.refiner.refine_all(images, size, tables, steps).astype(latent.dtype)

        def loss(z, z_tables):  # clipped to the tables its code will have (a hyperprior's: z's own)
            bits = np.array([8.0 * len(code) for code in self.latent_values(z, "code")])
            return self.refiner.distortions(images, size, z_tables, z) + bits / pixels

        better = loss(found, self.latent_tables(found)) < loss(latent, tables)
        return np.where(better[:, None, None, None], found, latent)

    # --- the pair the jobs call ----------------------------------------------------------------
    def compress(self, batch, latent_format, refine=0):
        n, height, width, channels = batch.images.shape
        rgb = batch.images if channels == 3 else np.repeat(batch.images, 3, axis=-1)
        latent = self.analysis(rgb)
        if refine and n:
            latent = self.refined(pad_to_multiple(rgb, self.stride), latent, (height, width), refine)
        values = self.latent_values(latent, latent_format)
        value = pa.array(values, pa.binary() if latent_format == "code" else pa.list_(pa.int16()))
        modes = batch.modes or [("L" if channels == 1 else "RGB")] * n
        return {"code" if latent_format == "code" else "latent": value,
                "height": pa.array(np.full(n, height, np.int32)),
                "width": pa.array(np.full(n, width, np.int32)),
                "channels": pa.array(np.full(n, channels, np.int8)),
                "mode": pa.array(modes, pa.string()),
                "icc_profile": pa.array(batch.icc_profiles or [None] * n, pa.binary())}

    def decompress(self, table, max_pixels=DEFAULT_MAX_PIXELS):
        keys = table.column("key").to_pylist()
        labels, has_label = row_labels(table)
        heights = table.column("height").to_numpy(zero_copy_only=False)
        widths = table.column("width").to_numpy(zero_copy_only=False)
        channels = table.column("channels").to_numpy(zero_copy_only=False)
        modes = table.column("mode").to_pylist()
        # Datasets before format 4 have no profiles.
        profiles = (table.column("icc_profile").to_pylist() if "icc_profile" in table.column_names
                    else [None] * table.num_rows)
        coded = "code" in table.column_names
        words = code_words(table)
        values = table.column("code" if coded else "latent")
        # Rows of one shape are synthesized together, at most DECODE_PIXELS of them at a time, and
        # rows of many shapes never wait in more than about twice that (a part of camera photos).
        groups = ShapeGroups(table.num_rows or 1, DECODE_PIXELS, 2 * DECODE_PIXELS)
        for i in range(table.num_rows):
            h, w, c = int(heights[i]), int(widths[i]), int(channels[i])
            if not (h > 0 and w > 0 and c in (1, 3)):
                yield DeadLetter(keys[i], "", i, "bad_row", f"invalid image size {h}x{w}x{c}")
                continue
            if h * w > max_pixels:
                yield DeadLetter(keys[i], "", i, "too_many_pixels",
                                 f"{w}x{h} exceeds the {max_pixels}-pixel limit (--max-pixels)")
                continue
            if profiles[i] is not None and profile_for(profiles[i], c) is None:
                yield DeadLetter(keys[i], "", i, "bad_row", f"the row's colour profile does not describe {c}-channel "
                                                            "pixels")
                continue
            grid = (-(-h // self.stride), -(-w // self.stride))
            try:
                if coded:
                    latent = self.coder.decode(values[i].as_py(), *grid, words)
                else:
                    flat = values[i].values.to_numpy(zero_copy_only=False)
                    latent = flat.reshape(grid + (self.spec.latent_channels,))
                    if self.out_of_tables(latent):
                        yield DeadLetter(keys[i], "", i, "bad_latent", "latent values outside the model's tables")
                        continue
            except Exception as e:  # a damaged code or a latent list of the wrong length
                yield DeadLetter(keys[i], "", i, "bad_code", f"latents do not decode: {type(e).__name__}: {e}")
                continue
            for shape, rows in groups.add((h, w, c), (i, latent)):
                yield self._images(shape, rows, keys, labels, has_label, modes, profiles)
        for shape, rows in groups.rest():
            yield self._images(shape, rows, keys, labels, has_label, modes, profiles)

    def _images(self, shape, rows, keys, labels, has_label, modes, profiles) -> ImageBatch:
        """Same-shaped rows [(row, latent)] -> their ImageBatch, cropped to (h, w), grey where c is 1."""
        h, w, c = shape
        images = self.synthesis(np.stack([z for _, z in rows]))[:, :h, :w]
        if c == 1:
            images = np.round(images.astype(np.float32).mean(axis=-1, keepdims=True)).astype(np.uint8)
        idx = [i for i, _ in rows]
        return ImageBatch([keys[i] for i in idx], np.ascontiguousarray(images), labels[idx], has_label[idx],
                          modes=[modes[i] for i in idx], icc_profiles=[profiles[i] for i in idx])
