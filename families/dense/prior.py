"""The dense family's learned factorized prior over integer latents, frozen into integer tables,
and its mixture of table sets.

Each latent dimension d has a logistic density with learned location and scale. The
probability of an integer value k is the density's mass on [k - 0.5, k + 0.5], which
is also the likelihood of `y + U(-0.5, 0.5)` during training (Ballé et al. 2017).
At export the prior becomes integer frequency tables (CDFs), so entropy coding never
depends on floating-point results that could differ between machines.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from training.prior import PRECISION, quantize_pmf

# Table support: location +/- TAIL_SCALES * scale, at most MAX_SYMBOLS values per dimension.
TAIL_SCALES = 12.0


MAX_SYMBOLS = 255


class FactorizedPrior(keras.layers.Layer):
    """Per-dimension logistic prior; `bits(y)` is the rate of the (noisy) latents."""

    def __init__(self, latent_dim: int, **kwargs):
        super().__init__(name="prior", **kwargs)
        self.loc = self.add_weight(shape=(latent_dim,), initializer="zeros", name="loc")
        self.log_scale = self.add_weight(shape=(latent_dim,), initializer="zeros", name="log_scale")

    def likelihood(self, y):
        scale = tf.exp(self.log_scale)
        upper = tf.sigmoid((y - self.loc + 0.5) / scale)
        lower = tf.sigmoid((y - self.loc - 0.5) / scale)
        return tf.maximum(upper - lower, 1e-9)

    def bits(self, y):
        """Total bits per image, summed over latent dimensions: shape [N]."""
        return tf.reduce_sum(-tf.math.log(self.likelihood(y)) / tf.math.log(2.0), axis=-1)


def freeze(prior: FactorizedPrior) -> dict:
    """The prior as integer tables: for each dimension an offset and frequencies summing to 2**PRECISION."""
    loc = np.asarray(prior.loc, np.float64)
    scale = np.exp(np.asarray(prior.log_scale, np.float64))
    offsets, tables = [], []
    for mu, s in zip(loc, scale):
        lo = int(np.floor(mu - TAIL_SCALES * s))
        hi = int(np.ceil(mu + TAIL_SCALES * s))
        if hi - lo + 1 > MAX_SYMBOLS:  # keep very wide priors codable in a bounded table
            lo = int(round(mu)) - MAX_SYMBOLS // 2
            hi = lo + MAX_SYMBOLS - 1
        k = np.arange(lo, hi + 1, dtype=np.float64)
        cdf = lambda v: 1.0 / (1.0 + np.exp(-(v - mu) / s))  # noqa: E731
        pmf = cdf(k + 0.5) - cdf(k - 0.5)
        # Values outside the table are clipped to its ends at encode time: fold the tails in.
        pmf[0] += cdf(lo - 0.5)
        pmf[-1] += 1.0 - cdf(hi + 0.5)
        offsets.append(lo)
        tables.append(quantize_pmf(pmf).tolist())
    return {"kind": "factorized-logistic", "precision": PRECISION, "offsets": offsets, "frequencies": tables,
            "loc": loc.tolist(), "scale": scale.tolist()}


# Table sets of a dense model's mixture prior: the trained prior plus MIXTURE_COMPONENTS - 1 fitted ones.
MIXTURE_COMPONENTS = 16


def add_mixture(model: dict, symbols: np.ndarray, components: int = MIXTURE_COMPONENTS, iterations: int = 12,
                seed: int = 0, smoothing: float = 0.1) -> dict:
    """A frozen factorized prior (`freeze`'s dict) made a mixture of `components` table sets.

    Set 0 is the trained prior itself; the others are fitted to the training latents (`symbols`:
    integers [N, D], minus the tables' offsets) by hard EM on code length: each image goes to
    the set that codes it shortest, each set is re-estimated from its images' histograms
    (`smoothing` added to every count, so no value is ever impossible). An image's code names
    its set first (with the sets' frequencies as the table), then its latents under that set,
    so decoding never chooses anything: the choice is in the code. On MNIST digits 16 sets save
    3-6% of the code bytes of a factorized prior (its latents depend on each other through the
    digit's shape, which no single table set can see; BENCHMARKS.md, "Rate-distortion")."""
    sizes = [len(t) for t in model["frequencies"]]
    n, dims = symbols.shape
    width = max(sizes)
    base = np.zeros((dims, width))
    for d, table in enumerate(model["frequencies"]):
        base[d, :sizes[d]] = np.asarray(table, np.float64)
    valid = np.arange(width)[None, :] < np.asarray(sizes)[:, None]
    rows = np.arange(dims)[None, :]

    def costs(pmfs):  # bits of every image under every set: [N, K]
        logs = -np.log2(np.where(valid, pmfs / pmfs.sum(-1, keepdims=True), 1.0))
        return np.stack([logs[k][rows, symbols].sum(1) for k in range(len(pmfs))], axis=1)

    def refit(assign):  # (each set's counts [K, D, width], each set's count of images [K])
        pmfs = [base]
        for k in range(1, components):
            counts = np.zeros((dims, width))
            members = symbols[assign == k]
            for d in range(dims):
                counts[d] = np.bincount(members[:, d], minlength=width)[:width]
            pmfs.append(np.where(valid, counts + smoothing, 0.0))
        return np.stack(pmfs), np.bincount(assign, minlength=components) + 1.0

    assign = np.random.default_rng(seed).integers(1, components, n) if components > 1 else np.zeros(n, int)
    for _ in range(iterations):
        pmfs, weights = refit(assign)
        new = (costs(pmfs) - np.log2(weights / weights.sum())).argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
    else:
        pmfs, weights = refit(assign)
    sets = [[quantize_pmf(pmfs[k, d, :sizes[d]]).tolist() for d in range(dims)] for k in range(1, components)]
    return dict(model, kind="factorized-mixture", components=[model["frequencies"]] + sets,
                weights=quantize_pmf(weights).tolist())
