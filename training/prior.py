"""A learned factorized prior over integer latents, and its freezing into integer tables.

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

# Frequencies of each table sum to 2**PRECISION.
PRECISION = 16
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


def quantize_pmf(pmf: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Float pmf -> integer frequencies >= 1 summing exactly to 2**precision."""
    total = 1 << precision
    freq = np.maximum(1, np.floor(pmf / pmf.sum() * (total - len(pmf))).astype(np.int64))
    # Hand out the remainder to the most probable symbols (largest first), one each.
    rest = total - int(freq.sum())
    order = np.argsort(-pmf, kind="stable")
    while rest > 0:
        step = min(rest, len(order))
        freq[order[:step]] += 1
        rest -= step
    while rest < 0:
        for i in order:
            if rest == 0:
                break
            if freq[i] > 1:
                freq[i] -= 1
                rest += 1
    assert freq.sum() == total and freq.min() >= 1
    return freq
