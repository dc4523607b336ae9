"""The entropy models training shares (CompressAI's `entropy_models`): a per-channel learned
density (the photo families' factorized prior and side information), and the freezing of any
probabilities into integer tables.

The probability of an integer value k is the density's mass on [k - 0.5, k + 0.5], which
is also the likelihood of `y + U(-0.5, 0.5)` during training (Ballé et al. 2017).
At export a prior becomes integer frequency tables (CDFs), so entropy coding never
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


class DeepFactorizedPrior(keras.layers.Layer):
    """Per-channel non-parametric density (Ballé et al. 2018, appendix 6.1) for spatial latents.

    Each channel's cumulative distribution is a small monotone network (1-3-3-3-1, softplus
    weights, tanh gates). The probability of an integer is cdf(k + 0.5) - cdf(k - 0.5), which
    is also the likelihood of `y + U(-0.5, 0.5)` in training. `bits(y)` sums over a whole
    latent tensor [N, h, w, C] per image.
    """

    FILTERS = (3, 3, 3)

    def __init__(self, channels: int, init_scale: float = 10.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "prior"), **kwargs)
        self.channels = channels
        dims = (1,) + self.FILTERS + (1,)
        scale = init_scale ** (1.0 / (len(self.FILTERS) + 1))
        self.matrices, self.biases, self.factors = [], [], []
        for i in range(len(self.FILTERS) + 1):
            init = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
            self.matrices.append(self.add_weight(name=f"matrix{i}", shape=(channels, dims[i + 1], dims[i]),
                                                 initializer=keras.initializers.Constant(init)))
            self.biases.append(self.add_weight(name=f"bias{i}", shape=(channels, dims[i + 1], 1),
                                               initializer=keras.initializers.RandomUniform(-0.5, 0.5)))
            if i < len(self.FILTERS):
                self.factors.append(self.add_weight(name=f"factor{i}", shape=(channels, dims[i + 1], 1),
                                                    initializer="zeros"))

    def logits_cdf(self, x):
        """x: [C, 1, n] -> logits of the cdf at x, same shape."""
        logits = x
        for i, matrix in enumerate(self.matrices):
            logits = tf.linalg.matmul(tf.nn.softplus(matrix), logits) + self.biases[i]
            if i < len(self.factors):
                logits += tf.tanh(self.factors[i]) * tf.tanh(logits)
        return logits

    def likelihood(self, y):
        """y: [N, h, w, C] -> probability of each value's unit interval, same shape."""
        shape = tf.shape(y)
        flat = tf.reshape(tf.transpose(y, [3, 0, 1, 2]), [self.channels, 1, -1])
        lower = self.logits_cdf(flat - 0.5)
        upper = self.logits_cdf(flat + 0.5)
        # Subtract in the tail where both sigmoids are closer to 0 (numerically stable).
        sign = -tf.sign(lower + upper)
        p = tf.abs(tf.sigmoid(sign * upper) - tf.sigmoid(sign * lower))
        p = tf.reshape(p, [self.channels, shape[0], shape[1], shape[2]])
        return tf.maximum(tf.transpose(p, [1, 2, 3, 0]), 1e-9)

    def bits(self, y):
        """Total bits per image: shape [N]."""
        return tf.reduce_sum(-tf.math.log(self.likelihood(y)) / tf.math.log(2.0), axis=[1, 2, 3])


def freeze_channels(prior: DeepFactorizedPrior, tail_mass: float = 1e-7, max_symbols: int = 2047) -> dict:
    """The per-channel density as integer tables (offset + frequencies summing to 2**PRECISION).

    Each table covers the integers whose unit interval holds all but `tail_mass` of the
    channel's mass; the clipped tails are folded into the end symbols, and the pipeline
    clips latents to the table at encode time.
    """
    grid = np.arange(-(max_symbols // 2), max_symbols // 2 + 1, dtype=np.float32)
    edges = np.concatenate([grid - 0.5, grid[-1:] + 0.5])
    x = tf.constant(np.tile(edges[None, None, :], (prior.channels, 1, 1)))
    cdf = tf.sigmoid(prior.logits_cdf(x)).numpy()[:, 0, :].astype(np.float64)
    offsets, tables = [], []
    for c in range(prior.channels):
        cum = cdf[c]
        pmf = np.maximum(np.diff(cum), 0.0)
        inside = np.nonzero((cum[1:] > tail_mass / 2) & (cum[:-1] < 1 - tail_mass / 2))[0]
        lo, hi = (int(inside[0]), int(inside[-1])) if len(inside) else (max_symbols // 2, max_symbols // 2)
        table = pmf[lo:hi + 1].copy()
        table[0] += cum[lo]
        table[-1] += 1.0 - cum[hi + 1]
        offsets.append(int(grid[lo]))
        tables.append(quantize_pmf(np.maximum(table, 1e-12)).tolist())
    return {"kind": "factorized-channels", "precision": PRECISION, "offsets": offsets, "frequencies": tables}


def fit_to_tables(prior: DeepFactorizedPrior, tables: dict, steps: int = 3000, learning_rate: float = 0.01) -> float:
    """Recover a density from its frozen integer tables (`freeze_channels`' output, as a model
    artifact stores the side information's prior): fit the layer's weights by minimizing the
    cross-entropy of each table's pmf under the density's mass on the same unit intervals (the
    end symbols' own intervals too: the tails they took at freezing are below `tail_mass`, and a
    density free to put mass beyond them would move it off the table). A fit from an artifact starts from this
    instead of a fresh density, which would cost every image its side information again (+31%
    bits on 32x32 photos, measured). Returns the remaining gap in bits per symbol, averaged over
    channels (the KL divergence of the tables from the fitted density)."""
    offsets, frequencies = tables["offsets"], tables["frequencies"]
    if len(offsets) != prior.channels:
        raise ValueError(f"{len(offsets)} tables for a prior of {prior.channels} channels")
    width = max(len(f) for f in frequencies)
    values = np.zeros((prior.channels, 1, width), np.float32)
    target = np.zeros((prior.channels, 1, width), np.float32)
    for c, (offset, freq) in enumerate(zip(offsets, frequencies)):
        n = len(freq)
        values[c, 0, :n] = offset + np.arange(n)
        values[c, 0, n:] = offset + n - 1  # padding: weight 0
        target[c, 0, :n] = np.asarray(freq, np.float64) / np.sum(freq)
    entropy = -np.sum(np.where(target > 0, target * np.log2(np.maximum(target, 1e-30)), 0.0)) / prior.channels
    # Start each channel as a density of the table's own location and spread (the layer's
    # initializer, with a scale per channel), so that a few thousand steps shape it.
    mean = np.sum(target * values, axis=(1, 2))
    spread = np.sqrt(np.sum(target * (values - mean[:, None, None]) ** 2, axis=(1, 2)))
    dims = (1,) + prior.FILTERS + (1,)
    layers = len(prior.matrices)
    for i, matrix in enumerate(prior.matrices):
        scale = np.maximum(2.0 * spread + 0.2, 0.2) ** (1.0 / layers)
        init = np.log(np.expm1(1.0 / scale / dims[i + 1]))
        matrix.assign(np.broadcast_to(init[:, None, None], matrix.shape).astype(np.float32))
    for factor in prior.factors:
        factor.assign(tf.zeros_like(factor))
    for i, bias in enumerate(prior.biases):
        bias.assign(tf.zeros_like(bias))
    # The first layer's bias puts the middle of the cdf at the mean.
    slope = np.log1p(np.exp(prior.matrices[0].numpy()))[:, :, 0]
    prior.biases[0].assign((-slope * mean[:, None])[:, :, None].astype(np.float32))
    values, target = tf.constant(values), tf.constant(target)
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = prior.trainable_variables

    @tf.function
    def cross_entropy():
        lower = tf.sigmoid(prior.logits_cdf(values - 0.5))
        upper = tf.sigmoid(prior.logits_cdf(values + 0.5))
        mass = tf.maximum(upper - lower, 1e-12)
        return -tf.reduce_sum(target * tf.math.log(mass)) / np.log(2.0) / prior.channels

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = cross_entropy()
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    for _ in range(steps):
        step()
    return float(cross_entropy()) - float(entropy)
