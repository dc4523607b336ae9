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
        total = tf.cast(steps, tf.float32)
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
            if t < steps:  # Adam, with the step size decaying on a cosine
                g = tape.gradient(loss, y)
                step = tf.cast(t, tf.float32) + 1.0
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * tf.square(g)
                decay = FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (1 + tf.cos(math.pi * (step - 1) / total))
                y = y - LEARNING_RATE * decay * (m / (1 - 0.9 ** step)) / (tf.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
        return best

    def __call__(self, images: np.ndarray, steps: int) -> np.ndarray:
        import tensorflow as tf

        out = [self._run(tf.constant(images[i:i + CHUNK]), tf.constant(steps, tf.int32)).numpy()
               for i in range(0, len(images), CHUNK)]
        return np.concatenate(out).astype(np.int64)
