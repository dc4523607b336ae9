"""Encoder-side refinement: spend encode time to find better latents for the same decoder.

    latentpack encode --model-dir model/ --refine 50 ...

An encoder network is a one-pass guess at the latents that minimise the model's own objective,
distortion + lambda * rate; a small encoder (the dense presets) guesses far from the best.
Refinement starts from that guess and runs `steps` of gradient descent on each image's latents
(the "amortization gap" of Campos et al. 2019 and Yang et al. 2020): distortion through the
artifact's differentiable `synthesize` signature with rounding passed straight through, rate
from the artifact's own integer tables (their code lengths, interpolated between integers,
the cheapest table set of a mixture). After every step the rounded latents are scored exactly as
they will be stored (table code lengths, clipped to the quantizer's range) and each image keeps
its best, so refinement never returns latents worse by that score than the encoder's own.
That is `Refiner`, for dense models; `TransformRefiner` does the same for the spatial families
(photos), on the continuous relaxation and tile by tile for large images (its docstring says why).

Only encoding changes: the codes are ordinary codes of the same model, decoded by the same
decoder on any machine (refinement itself need not be deterministic, decoding is).
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.entropy import EntropyCoder

LEARNING_RATE = 0.1  # latents are in quantizer steps: a tenth of a step per update at first
FINAL_FRACTION = 0.05  # cosine decay of the step size down to this fraction of it
MAX_BITS = 40.0  # the code length of a value outside a table: a wall, not an infinity
CHUNK = 256  # images per gradient computation (bounds the decoder's activations)


def adam_step(y, g, m, v, t, steps, learning_rate):
    """One step of Adam on latents y (gradient g, moments m and v; t = 0, 1, ... of `steps`), its
    step size decaying on a cosine from `learning_rate` to FINAL_FRACTION of it. (y, m, v) after."""
    import tensorflow as tf

    step = tf.cast(t, tf.float32) + 1.0
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * tf.square(g)
    progress = (step - 1) / tf.cast(steps, tf.float32)
    decay = FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + tf.cos(math.pi * progress))
    return y - learning_rate * decay * (m / (1 - 0.9 ** step)) / (tf.sqrt(v / (1 - 0.999 ** step)) + 1e-8), m, v


class Refiner:
    """uint8 images [N, H, W, C] -> refined integer latents [N, D] for a dense artifact.

    `analyze(images=...)["latent"]` and `synthesize(latent=...)["image"]` are the artifact's
    signatures; `coder` its entropy coder; `low`/`high` the quantizer's integer range; `lmbda` the
    rate weight it was trained with (loss = MSE on [0, 1] pixels + lmbda * bits per pixel)."""

    def __init__(self, analyze, synthesize, coder: EntropyCoder, low, high, lmbda: float, pixels: int):
        import tensorflow as tf

        self.analyze, self.synthesize = analyze, synthesize
        self.lmbda, self.pixels = float(lmbda), float(pixels)
        self.low = tf.constant(np.asarray(low, np.float32))
        self.high = tf.constant(np.asarray(high, np.float32))
        sets, dims, width = coder.costs.shape
        self.width = width
        # Bits of each value of each dimension, per set: [K, D * W]; padding and zero-probability
        # values cost MAX_BITS, so the interpolation leans away from them.
        bits = np.minimum(coder.costs / 1024.0, MAX_BITS)
        bits[:, np.arange(width)[None, :] >= coder.sizes[:, None]] = MAX_BITS
        self.bits = tf.constant(bits.reshape(sets, dims * width).astype(np.float32))
        self.set_bits = tf.constant((coder.set_costs / 1024.0).astype(np.float32))
        self.offsets = tf.constant(coder.offsets.astype(np.float32))
        self.sizes = tf.constant(coder.sizes.astype(np.float32))
        shape = analyze.structured_input_signature[1]["images"].shape
        self._run = tf.function(self._refine, input_signature=[
            tf.TensorSpec(shape, tf.uint8), tf.TensorSpec([], tf.int32)])

    def rate(self, latent):
        """Estimated code bits [N] of float latents [N, D]: each table's code lengths interpolated
        linearly between integers (exact at integers), the cheapest set of a mixture."""
        import tensorflow as tf

        u = tf.clip_by_value(latent - self.offsets, 0.0, self.sizes - 1.0)
        i = tf.minimum(tf.floor(u), tf.maximum(self.sizes - 2.0, 0.0))
        frac = u - i
        index = tf.cast(i, tf.int32) + tf.range(tf.shape(latent)[1]) * self.width
        c0 = tf.gather(self.bits, index, axis=1)  # [K, N, D]
        c1 = tf.gather(self.bits, tf.minimum(index + 1, tf.shape(self.bits)[1] - 1), axis=1)
        per_set = tf.reduce_sum((1.0 - frac) * c0 + frac * c1, axis=2) + self.set_bits[:, None]
        return tf.reduce_min(per_set, axis=0)

    def _refine(self, images, steps):
        import tensorflow as tf

        x = tf.cast(images, tf.float32) / 255.0
        y = self.analyze(images=images)["latent"]
        m, v = tf.zeros_like(y), tf.zeros_like(y)
        best = tf.clip_by_value(tf.round(y), self.low, self.high)
        best_score = tf.fill(tf.shape(y)[:1], np.float32(np.inf))
        for t in tf.range(steps + 1):
            with tf.GradientTape() as tape:
                tape.watch(y)
                rounded = tf.clip_by_value(tf.round(y), self.low, self.high)
                # Rounding (and clipping) passed straight through to the decoder's gradient.
                stored = y + tf.stop_gradient(rounded - y)
                recon = self.synthesize(latent=stored)["image"]
                mse = tf.reduce_mean(tf.square(x - recon), axis=tf.range(1, tf.rank(x)))
                loss = tf.reduce_sum(mse + self.lmbda * self.rate(y) / self.pixels)
            score = mse + self.lmbda * self.rate(rounded) / self.pixels
            better = score < best_score
            best = tf.where(better[:, None], rounded, best)
            best_score = tf.where(better, score, best_score)
            if t < steps:
                y, m, v = adam_step(y, tape.gradient(loss, y), m, v, t, steps, LEARNING_RATE)
        return best

    def __call__(self, images: np.ndarray, steps: int) -> np.ndarray:
        import tensorflow as tf

        out = [self._run(tf.constant(images[i:i + CHUNK]), tf.constant(steps, tf.int32)).numpy()
               for i in range(0, len(images), CHUNK)]
        return np.concatenate(out).astype(np.int64)


# --- spatial families (photos): latents [h, w, M] with a table chosen per latent ------------------

TRANSFORM_LEARNING_RATE = 0.1  # in quantizer steps; 0.05 and 0.2 did as well or a little worse
# Pixels per gradient computation (bounds the synthesis' activations: refining a 24-megapixel
# photo peaked at 2.36-2.45 GB with 1024x1024 and tiles of 64 latents, 2.13-2.17 with these,
# about 7% slower; scripts/tile_study.py, BENCHMARKS.md).
REGION_PIXELS = 768 * 768
TILE_LATENTS = 48  # a larger image is refined in tiles of this many latents a side (768 px at stride 16) ...
TILE_MARGIN = 4  # ... each seeing this many latents around it, held fixed (beyond the synthesis' reach)
SCORE_EVERY = 5  # steps between scorings of the rounded latents (a synthesis each; the loss falls steadily)


class LatentTables:
    """The table of each latent [..., h, w, M] (`index`), and where a family centres its tables on a
    predicted mean (channelwise), the value each table's zero stands for (`centre`; else None).
    Indexes like an array; the refiner takes it wherever it takes a plain array of table indexes."""

    def __init__(self, index: np.ndarray, centre=None):
        self.index, self.centre = index, centre

    @property
    def shape(self):
        return self.index.shape

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key):
        return LatentTables(self.index[key], None if self.centre is None else self.centre[key])


def _split(tables):
    """(table indexes, centres or None) of a LatentTables or a plain array of indexes."""
    return (tables.index, tables.centre) if isinstance(tables, LatentTables) else (tables, None)


def table_bits(model: dict):
    """(bits [T, W], low [T], size [T]) of integer tables {"offsets", "frequencies", "precision"}:
    the code length of value low[t] + k under table t at bits[t, k]; MAX_BITS past a table's end."""
    tables = model["frequencies"]
    width = max(len(t) for t in tables) + 1
    bits = np.full((len(tables), width), MAX_BITS, np.float32)
    for t, freq in enumerate(tables):
        freq = np.asarray(freq, np.float64)
        with np.errstate(divide="ignore"):
            bits[t, :len(freq)] = np.minimum(-np.log2(freq / float(1 << model["precision"])), MAX_BITS)
    return bits, np.asarray(model["offsets"], np.float32), np.array([len(t) for t in tables], np.float32)


class TransformRefiner:
    """Refined integer latents for a spatial-family artifact: one image, any size.

    `analysis`/`synthesis`: the artifact's float transforms (`spatial.apply_transform` on its
    stored layers, float32 here). `tables`: `table_bits` of the tables the latents are coded
    with; `lmbda`: the rate weight it was trained with (loss = lmbda * 255^2 * MSE + bits per
    pixel). Each call gets, per latent, the table that codes it (a channel's, or the one a
    hyperprior chose; held fixed while searching).

    The search descends the continuous relaxation: from the analysis' unrounded latents, the
    loss of the image synthesised from the float latents and their interpolated code lengths.
    Every SCORE_EVERY steps and after the last, the rounded latents are scored as they will be
    stored (table code lengths, distortion of the image synthesised from them, on the image's
    own pixels, not its padding); the image keeps its best, the encoder's own latents included.
    (Rounding passed straight through to the synthesis, as the dense refiner does, or faded in
    over the steps, made held-out photos' latents worse than the encoder's by that score, step
    after step; the relaxation's score fell steadily, about 4% of the loss in 30 steps.) Images
    above REGION_PIXELS are refined in tiles of TILE_LATENTS latents, each with TILE_MARGIN
    latents of fixed context around it, one after the other, so memory stays bounded; smaller
    images are searched together, REGION_PIXELS at a time (`refine_all`), each keeping its own best.
    """

    def __init__(self, analysis, synthesis, tables, lmbda: float):
        import tensorflow as tf

        self.analysis, self.synthesis, self.lmbda = analysis, synthesis, float(lmbda)
        bits, self.table_low, self.table_size = tables
        self.width = bits.shape[1]
        self.bits = tf.constant(bits.reshape(-1))
        spec = tf.TensorSpec
        signature = [spec([None, None, None, 3], tf.float32), spec([None, None, None, 1], tf.float32),
                     spec([None, None, None, None], tf.float32), spec([None, None, None, 1], tf.float32),
                     spec([None, None, None, None], tf.float32), spec([None, None, None, None], tf.float32),
                     spec([None, None, None, None], tf.int32)]
        self._gradient = tf.function(self._relaxed_gradient, input_signature=signature)
        self._score = tf.function(self._stored_loss, input_signature=signature)

    def _rate(self, y, low, size, base):
        """Bits of float latents, each with its table (low, size, base = table * width): the code
        lengths interpolated linearly between integers (exact at integers)."""
        import tensorflow as tf

        u = tf.clip_by_value(y - low, 0.0, size - 1.0)
        i = tf.minimum(tf.floor(u), tf.maximum(size - 2.0, 0.0))
        frac = u - i
        index = tf.cast(i, tf.int32) + base
        return (1.0 - frac) * tf.gather(self.bits, index) + frac * tf.gather(self.bits, index + 1)

    def _loss(self, x, weight, latent, recon, free, low, size, base):
        """Per image of the batch: lambda * 255^2 * MSE on its weighed pixels + its free latents' bits
        per weighed pixel."""
        import tensorflow as tf

        pixels = tf.reduce_sum(weight, axis=[1, 2, 3])
        mse = tf.reduce_sum(weight * tf.square(x - recon), axis=[1, 2, 3]) / (3.0 * pixels)
        bits = tf.reduce_sum(free * self._rate(latent, low, size, base), axis=[1, 2, 3])
        return self.lmbda * 255.0 ** 2 * mse + bits / pixels

    def _relaxed_gradient(self, x, weight, y, free, low, size, base):
        """Gradient of the relaxed loss (float latents, no rounding) at y."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(y)
            relaxed = tf.reduce_sum(self._loss(x, weight, y, self.synthesis(y), free, low, size, base))
        return tape.gradient(relaxed, y)  # each image's loss depends on its own latents only

    def _stored_loss(self, x, weight, y, free, low, size, base):
        """(loss of round(y) as it would be stored, per image; round(y))."""
        import tensorflow as tf

        rounded = tf.clip_by_value(tf.round(y), low, low + size - 1.0)
        recon = tf.clip_by_value(self.synthesis(rounded), 0.0, 1.0)
        return self._loss(x, weight, rounded, recon, free, low, size, base), rounded

    def refine_all(self, images: np.ndarray, size, tables: np.ndarray, steps: int) -> np.ndarray:
        """A batch of same-shaped images: up to REGION_PIXELS of them searched together (small
        images: one search per image cost ~0.2 s of call overhead for a 32x32 one), larger ones
        one by one (`__call__`)."""
        if self._one_by_one(images):
            return np.stack([self(image, size, table, steps) for image, table in zip(images, tables)])
        out = []
        for x, weight, chunk in self._groups(images, size):
            y = self.analysis(x)
            free = np.ones(y.shape[:3] + (1,), np.float32)
            out.append(self._search(x, weight, y, free, *self._tables(tables[chunk]), steps))
        return np.concatenate(out).astype(np.int32)

    def distortions(self, images: np.ndarray, size, tables: np.ndarray, latents: np.ndarray) -> np.ndarray:
        """`distortion` of each image of a batch (small ones together, as `refine_all` searched them)."""
        import tensorflow as tf

        if self._one_by_one(images):
            return np.array([self.distortion(image, size, table, z) for image, table, z in zip(images, tables, latents)])
        out = []
        for x, weight, chunk in self._groups(images, size):
            y = latents[chunk].astype(np.float32)
            free = np.zeros(y.shape[:3] + (1,), np.float32)
            loss, _ = self._score(*[tf.constant(v) for v in (x, weight, y, free, *self._tables(tables[chunk]))])
            out.append(loss.numpy())
        return np.concatenate(out).astype(np.float64)

    @staticmethod
    def _one_by_one(images: np.ndarray) -> bool:
        """Whether images of this shape are searched one at a time (`__call__`) rather than in groups."""
        return images.shape[1] * images.shape[2] > REGION_PIXELS // 2

    @staticmethod
    def _groups(images: np.ndarray, size):
        """(pixels as floats, weight: 1 on each image's own pixels, the slice of the batch) for groups of
        at most REGION_PIXELS of small images."""
        per_call = REGION_PIXELS // (images.shape[1] * images.shape[2])
        for i in range(0, len(images), per_call):
            chunk = slice(i, i + per_call)
            x = images[chunk].astype(np.float32) / 255.0
            weight = np.zeros(x.shape[:3] + (1,), np.float32)
            weight[:, :size[0], :size[1]] = 1.0
            yield x, weight, chunk

    def __call__(self, image: np.ndarray, size, table: np.ndarray, steps: int) -> np.ndarray:
        """image: uint8 [H, W, 3] padded to the stride; size: its own (height, width); table: int
        [h, w, M], the table of each latent. Returns refined integer latents [h, w, M]."""
        x = image.astype(np.float32) / 255.0
        y = self.analysis(x[None])[0]
        low, size_, _ = self._tables(table)
        out = np.clip(np.round(y), low, low + size_ - 1)
        del low, size_  # each region's tables are looked up as it is searched: no whole-grid copies
        for (a, b), inner, tile, weight in self._regions(image.shape[:2], table.shape[:2], size):
            context = out[a, b].copy()  # each tile sees the earlier tiles' refined latents around it
            context[inner] = y[tile]
            free = np.zeros(context.shape[:2] + (1,), np.float32)
            free[inner] = 1.0
            region = (x[self._pixels(a, b, x, table)], weight, context, free, *self._tables(table[a, b]))
            out[tile] = self._search(*[v[None] for v in region], steps)[0][inner]
        return out.astype(np.int32)

    def distortion(self, image: np.ndarray, size, table: np.ndarray, latent: np.ndarray) -> float:
        """lambda * 255^2 * MSE of the image synthesised from integer latents (clipped to their
        tables, as a code stores them), on the image's own pixels: the search's own measure, region
        by region as it searched, so it costs no more memory than the search did."""
        import tensorflow as tf

        x = image.astype(np.float32) / 255.0
        total = 0.0
        for (a, b), inner, tile, weight in self._regions(image.shape[:2], table.shape[:2], size):
            region = [tf.constant(v[None]) for v in (x[self._pixels(a, b, x, table)], weight,
                                                     latent[a, b].astype(np.float32))]
            free = tf.zeros(region[2].shape[:3] + (1,))
            loss, _ = self._score(*region, free, *[tf.constant(v[None]) for v in self._tables(table[a, b])])
            total += float(loss[0]) * float(weight.sum())
        return total / (size[0] * size[1])

    def _tables(self, table: np.ndarray):
        """(low, size, base) of each latent's table: its lowest value, its number of values, and its
        row's offset in the flattened code lengths."""
        index, centre = _split(table)
        low = self.table_low[index] if centre is None else self.table_low[index] + centre.astype(np.float32)
        return low, self.table_size[index], index.astype(np.int32) * self.width

    @staticmethod
    def _pixels(a: slice, b: slice, x: np.ndarray, table: np.ndarray):
        stride = x.shape[0] // table.shape[0]
        return slice(a.start * stride, a.stop * stride), slice(b.start * stride, b.stop * stride)

    @staticmethod
    def _regions(shape, grid, size):
        """Per tile: ((rows, columns) of its latents with their context, the tile within them, the
        tile within the image's latents, the weight of each pixel of the region: 1 on the tile's
        own pixels of the image, 0 on its context and padding)."""
        stride = shape[0] // grid[0]
        step = max(grid) if shape[0] * shape[1] <= REGION_PIXELS else TILE_LATENTS
        for t0 in range(0, grid[0], step):
            for s0 in range(0, grid[1], step):
                t1, s1 = min(t0 + step, grid[0]), min(s0 + step, grid[1])
                a0, b0 = max(0, t0 - TILE_MARGIN), max(0, s0 - TILE_MARGIN)
                a1, b1 = min(grid[0], t1 + TILE_MARGIN), min(grid[1], s1 + TILE_MARGIN)
                weight = np.zeros(((a1 - a0) * stride, (b1 - b0) * stride, 1), np.float32)
                weight[(t0 - a0) * stride:min(t1 * stride, size[0]) - a0 * stride,
                       (s0 - b0) * stride:min(s1 * stride, size[1]) - b0 * stride] = 1.0
                yield ((slice(a0, a1), slice(b0, b1)), (slice(t0 - a0, t1 - a0), slice(s0 - b0, s1 - b0)),
                       (slice(t0, t1), slice(s0, s1)), weight)

    def _search(self, x, weight, y, free, low, size, base, steps: int) -> np.ndarray:
        """Per region of a batch [n, ...], the best rounded latents found in `steps` steps of Adam
        (the encoder's own rounding included); latents outside `free` stay as they are."""
        import tensorflow as tf

        args = [tf.constant(v) for v in (x, weight)]
        tables = [tf.constant(v) for v in (low, size, base)]
        free_t = tf.constant(free)
        y = tf.constant(y.astype(np.float32))
        best_score, best = self._score(*args, y, free_t, *tables)  # the encoder's own latents, rounded
        m, v = tf.zeros_like(y), tf.zeros_like(y)
        for t in range(steps):
            g = self._gradient(*args, y, free_t, *tables) * free_t
            y, m, v = adam_step(y, g, m, v, t, steps, TRANSFORM_LEARNING_RATE)
            if (t + 1) % SCORE_EVERY == 0 or t + 1 == steps:
                score, rounded = self._score(*args, y, free_t, *tables)
                better = score < best_score
                best = tf.where(better[:, None, None, None], rounded, best)
                best_score = tf.where(better, score, best_score)
        return best.numpy()
