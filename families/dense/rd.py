"""Rate-distortion training: quantization-aware autoencoder + learned factorized prior.

Loss = distortion + lambda * rate, with distortion the MSE on [0, 1] pixels and rate
the prior's estimate of bits per pixel. Rounding is simulated two ways, as in the
reference implementations: additive uniform noise for the rate term, and rounding
with a straight-through gradient for the decoder's input.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import tensorflow as tf

from pipeline.errors import log
from families.dense import model
from families.dense.prior import FactorizedPrior

# --quality 1..8 -> (lambda, latent_dim, conv width): low to high quality. The prior makes unused
# latent dimensions nearly free, so latent_dim is generous; the high presets need a wider model
# to reach their distortion at all, and preset 8, the widest, keeps improving for many more
# epochs than the others (scripts/rd.py trains LONG_PRESETS for --long-epochs).
QUALITY_PRESETS = {
    1: (0.16, 64, 16), 2: (0.08, 64, 16), 3: (0.04, 64, 16), 4: (0.02, 64, 16),
    5: (0.01, 64, 32), 6: (0.005, 64, 32), 7: (0.002, 96, 48), 8: (0.0015, 128, 64),
}
LONG_PRESETS = (8,)


def train_rd(config, train_x: np.ndarray, val_x: np.ndarray):
    """(encoder, decoder, prior, history) trained on uint8 images."""
    import keras

    image_shape = tuple(train_x.shape[1:])
    pixels = float(math.prod(image_shape))
    encoder, decoder = model.build(config.arch, image_shape, config.latent_dim, config.width)
    prior = FactorizedPrior(config.latent_dim)
    prior.build((None, config.latent_dim))
    variables = encoder.trainable_variables + decoder.trainable_variables + prior.trainable_variables
    steps = math.ceil(len(train_x) / config.batch_size)
    # Cosine decay to 5% of the initial rate: the last epochs refine at a small step size.
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, max(1, config.epochs * steps), alpha=0.05)
    optimizer = keras.optimizers.Adam(schedule)
    lmbda = tf.constant(config.lmbda, tf.float32)

    @tf.function(reduce_retracing=True)
    def step(x):
        with tf.GradientTape() as tape:
            y = encoder(x, training=True)
            noisy = y + tf.random.uniform(tf.shape(y), -0.5, 0.5)
            rounded = y + tf.stop_gradient(tf.round(y) - y)
            mse = tf.reduce_mean(tf.square(x - decoder(rounded, training=True)))
            bpp = tf.reduce_mean(prior.bits(noisy)) / pixels
            loss = mse + lmbda * bpp
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, mse, bpp

    @tf.function(reduce_retracing=True)
    def evaluate(x):
        y = tf.round(encoder(x, training=False))
        mse = tf.reduce_mean(tf.square(x - decoder(y, training=False)), axis=[1, 2, 3])
        return mse, prior.bits(y)

    x_all = train_x.astype(np.float32) / 255.0
    v_all = val_x.astype(np.float32) / 255.0
    rng = np.random.default_rng(config.seed)
    history = {"loss": [], "val_loss": [], "val_psnr": [], "val_bytes": []}
    for epoch in range(config.epochs):
        started = time.time()
        order = rng.permutation(len(x_all))
        total = np.zeros(3)
        for i in range(steps):
            batch = x_all[order[i * config.batch_size:(i + 1) * config.batch_size]]
            total += [float(t) for t in step(tf.constant(batch))]
            if sys.stdout.isatty():
                print(f"\r  epoch {epoch + 1}/{config.epochs} step {i + 1}/{steps}", end="", flush=True)
        loss, mse, bpp = total / steps
        history["loss"].append(loss)
        line = f"epoch {epoch + 1}/{config.epochs}: loss {loss:.5f} (mse {mse:.5f}, {bpp * pixels / 8:.1f} bytes/image)"
        if len(v_all):
            v_mse, v_bits = (np.concatenate(a) for a in zip(*(
                [t.numpy() for t in evaluate(tf.constant(v_all[i:i + 1024]))] for i in range(0, len(v_all), 1024))))
            v_psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(v_mse, 1e-10))))
            history["val_loss"].append(float(v_mse.mean() + config.lmbda * v_bits.mean() / pixels))
            history["val_psnr"].append(v_psnr)
            history["val_bytes"].append(float(v_bits.mean() / 8))
            line += f"; validation {v_psnr:.2f} dB at {v_bits.mean() / 8:.1f} bytes/image (estimated)"
        print(("\r" if sys.stdout.isatty() else "") + line + f" [{time.time() - started:.0f} s]", flush=True)
        log.debug(line)
    return encoder, decoder, prior, history
