"""Autoencoder architectures: name -> builder of (encoder, decoder) Keras models.

Encoders take float images in [0, 1] shaped (H, W, C) and return float latents [D];
decoders do the reverse. Quantization is added at export (training/export.py).
"""
from __future__ import annotations

import math

import keras
from keras import layers

ARCHS = {}


def register(name):
    def wrap(fn):
        ARCHS[name] = fn
        return fn
    return wrap


def build(arch: str, image_shape: tuple, latent_dim: int, width: int = 16):
    """(encoder, decoder) for `arch` on images of `image_shape`; `width` sizes the conv arch."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch == "conv":
        return ARCHS[arch](tuple(image_shape), latent_dim, width)
    return ARCHS[arch](tuple(image_shape), latent_dim)


@register("mlp")
def mlp(image_shape, latent_dim):
    """The reference tutorial model: 784 -> 64 -> 32 -> 32 -> 64 -> 784 (MNIST)."""
    pixels = math.prod(image_shape)
    encoder = keras.Sequential([
        keras.Input(image_shape),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(latent_dim, activation="relu"),
    ], name="encoder")
    decoder = keras.Sequential([
        keras.Input((latent_dim,)),
        layers.Dense(32, activation="relu"),
        layers.Dense(64, activation="relu"),
        layers.Dense(pixels, activation="sigmoid"),
        layers.Reshape(image_shape),
    ], name="decoder")
    return encoder, decoder


@register("conv")
def conv(image_shape, latent_dim, width=16):
    """Two stride-2 conv stages down to a linear bottleneck, and their mirror image up.

    ELU rather than ReLU: on MNIST it leaves the predict-the-mean plateau in the
    first epoch instead of the fifth, which matters for short CPU runs.
    """
    h, w, c = image_shape
    h4, w4 = math.ceil(h / 4), math.ceil(w / 4)
    encoder = keras.Sequential([
        keras.Input(image_shape),
        layers.Conv2D(width, 3, strides=2, padding="same", activation="elu"),
        layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="elu"),
        layers.Flatten(),
        layers.Dense(latent_dim),
    ], name="encoder")
    decoder = keras.Sequential([
        keras.Input((latent_dim,)),
        layers.Dense(h4 * w4 * 2 * width, activation="elu"),
        layers.Reshape((h4, w4, 2 * width)),
        layers.Conv2DTranspose(2 * width, 3, strides=2, padding="same", activation="elu"),
        layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="elu"),
        layers.Conv2D(c, 3, padding="same", activation="sigmoid"),
        # The upsampled grid is a multiple of 4; crop back to the image size.
        layers.Cropping2D(((0, 4 * h4 - h), (0, 4 * w4 - w))),
    ], name="decoder")
    return encoder, decoder
