"""The photo families' image transforms (Ballé et al. 2017, "bls2017"), defined once for training,
the exported SavedModel and encoder-side refinement.

Analysis: log2(stride) stride-2 5x5 convolutions with GDN between them, down to latents of
shape [H/stride, W/stride, M]; synthesis: the mirror image with IGDN and transposed
convolutions. `build_transforms` makes them as Keras models (training); `apply_transform`
computes them from the stored layers of an artifact (its `encode`/`decode` signatures, and
refinement's gradients); `transform_weights` moves one into the other, and tests check they agree.
The PyTorch trainer for lent GPUs (`scripts/gpu_train.py`) mirrors them, checked by
`tests/test_gpu_train.py`.
"""
from __future__ import annotations

import numpy as np

STRIDE = 16
KERNEL_STORAGE = "int8"  # how exported SavedModels store convolution kernels (`stored_kernel`)


def build_transforms(filters: int, latent_channels: int, channels: int = 3, stride: int = STRIDE):
    """(analysis, synthesis) Keras models for images of any size (a multiple of `stride`): log2(stride)
    stride-2 stages, GDN between them."""
    import keras
    from keras import layers

    from families.spatial.layers import GDN

    def conv(n, name):
        return layers.Conv2D(n, 5, strides=2, padding="same", name=name)

    def deconv(n, name):
        return layers.Conv2DTranspose(n, 5, strides=2, padding="same", name=name)

    stages = int(np.log2(stride))
    analysis, synthesis = [keras.Input((None, None, channels))], [keras.Input((None, None, latent_channels))]
    for i in range(stages - 1):
        analysis += [conv(filters, f"conv{i}"), GDN(name=f"gdn{i}")]
        synthesis += [deconv(filters, f"deconv{i}"), GDN(inverse=True, name=f"igdn{i}")]
    analysis.append(conv(latent_channels, f"conv{stages - 1}"))
    synthesis.append(deconv(channels, f"deconv{stages - 1}"))
    return keras.Sequential(analysis, name="analysis"), keras.Sequential(synthesis, name="synthesis")


def apply_transform(layers, x, synthesis: bool):
    """One of a spatial artifact's transforms on x, computed in x's dtype, from its stored layers.

    `layers`: the SavedModel's `analysis` or `synthesis` list (`SpatialModule`
    writes it, and its signatures compute with this function): per layer a tuple whose items 1
    and 2 are a GDN's beta [C] and gamma [C, C], or a convolution's kernel [5, 5, a, b] and bias,
    item 4 the kernel's int8 scale (absent or None for float16 kernels). A loaded SavedModel keeps
    these variables (not the layer kinds: the rank tells GDN from convolution), so encoder-side
    refinement can differentiate the very transforms the signatures run."""
    import tensorflow as tf

    dtype = x.dtype
    for layer in layers:
        a, b = layer[1], layer[2]
        scale = layer[4] if len(layer) > 4 else None
        if len(a.shape) == 1:  # GDN (analysis) or IGDN (synthesis)
            norm = tf.sqrt(tf.tensordot(tf.square(x), tf.transpose(tf.cast(b, dtype)), axes=[[-1], [0]])
                           + tf.cast(a, dtype))
            x = x * norm if synthesis else x / norm
            continue
        kernel = tf.cast(a, dtype) if scale is None else tf.cast(a, dtype) * tf.cast(scale, dtype)
        if synthesis:  # transposed convolution, stride 2, "same": output twice the input
            shape = tf.shape(x)
            out = tf.stack([shape[0], 2 * shape[1], 2 * shape[2], tf.shape(kernel)[2]])
            x = tf.nn.conv2d_transpose(x, kernel, out, strides=2, padding="SAME") + tf.cast(b, dtype)
        else:
            x = tf.nn.conv2d(x, kernel, strides=2, padding="SAME") + tf.cast(b, dtype)
    return x


def pad_to_multiple(images: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pad [N, H, W, C] on the bottom and right to multiples of `multiple`."""
    h, w = images.shape[1:3]
    if h % multiple == 0 and w % multiple == 0:
        return images
    return np.pad(images, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)), mode="edge")


def transform_weights(analysis, synthesis) -> dict:
    """The trained transforms as plain arrays: per layer ("conv", kernel, bias) or ("gdn", beta, gamma)."""
    def layers_of(model):
        out = []
        for layer in model.layers:
            if hasattr(layer, "gamma_v"):
                out.append(("gdn", np.asarray(layer.beta), np.asarray(layer.gamma), bool(layer.inverse)))
            else:
                out.append(("conv", np.asarray(layer.kernel), np.asarray(layer.bias), "Transpose" in type(layer).__name__))
        return out
    return {"analysis": layers_of(analysis), "synthesis": layers_of(synthesis)}


def stored_kernel(kernel: np.ndarray, storage: str = KERNEL_STORAGE, name: str = "kernel"):
    """A convolution kernel [kh, kw, a, b] as the SavedModel stores it: (variable, scale variable or None).

    "int8": symmetric 8-bit integers with one float32 scale per filter (per input and output
    channel: max |w| over the kh x kw taps / 127), a quarter of float32's bytes plus 4 bytes per
    25 weights; "float16": half. `dequantize` computes the kernel back. (One scale per output
    channel cost photo:4's synthesis 0.09 dB; one per filter 0.01.)"""
    import tensorflow as tf

    if storage == "float16":
        return tf.Variable(kernel.astype(np.float16), trainable=False, name=name), None
    scale = (np.abs(kernel.astype(np.float64)).max(axis=(0, 1), keepdims=True) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(kernel / scale.astype(np.float64)), -127, 127).astype(np.int8)
    return (tf.Variable(q, trainable=False, name=name),
            tf.Variable(scale, trainable=False, name=name + "_scale"))


def dequantize(kernel, scale, dtype):
    """The stored kernel in `dtype` (exact for both storages: int8 * float32 scale in float32 or float64)."""
    import tensorflow as tf

    kernel = tf.cast(kernel, dtype)
    return kernel if scale is None else kernel * tf.cast(scale, dtype)


def SpatialModule(weights: dict, latent_channels: int, storage: str = KERNEL_STORAGE,
                  synthesis_dtype: str = "float64"):
    """A tf.Module whose `encode`/`decode` signatures are the artifact's file format:
    uint8 images [N, H, W, 3] (H, W multiples of 16) <-> int16 latents [N, H/16, W/16, M].

    The graph is written with TensorFlow ops alone (no Keras objects in the SavedModel).
    Convolution kernels are stored as int8 with a float32 scale per filter
    (`stored_kernel`; models exported before 2026-11-30 store float16) and computed in floating
    point: about 30% of float32's bytes, for 0.01–0.02 dB on the shipped models (`metrics` hold
    the figures of the stored model; `--kernel-storage float16` exports the other way). GDN parameters stay float32, since gamma is often below
    float16's normal range. The decoder computes in float64 (`synthesis_dtype`): its pixels then
    match on any machine, thread count or oneDNN setting except in the rarest ties (in float32,
    isolated pixels came out one level apart between oneDNN on and off); it costs about twice
    the synthesis time.
    """
    import tensorflow as tf

    def variables(layers, prefix):
        out = []
        for i, (kind, a, b, flag) in enumerate(layers):
            if kind == "conv":
                a, scale = stored_kernel(a, storage, f"{prefix}{i}_a")
            else:
                a, scale = tf.Variable(a.astype(np.float32), trainable=False, name=f"{prefix}{i}_a"), None
            out.append((kind, a, tf.Variable(b.astype(np.float32), trainable=False, name=f"{prefix}{i}_b"), flag,
                        scale))
        return out

    class _Module(tf.Module):
        def __init__(self):
            super().__init__()
            self.analysis = variables(weights["analysis"], "analysis")
            self.synthesis = variables(weights["synthesis"], "synthesis")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
        def encode(self, images):
            y = apply_transform(self.analysis, tf.cast(images, tf.float32) / 255.0, synthesis=False)
            return {"latent": tf.cast(tf.clip_by_value(tf.round(y), -32767.0, 32767.0), tf.int16)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, latent_channels], tf.int16, name="latent")])
        def decode(self, latent):
            x = apply_transform(self.synthesis, tf.cast(latent, synthesis_dtype), synthesis=True)
            return {"image": tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)}

    return _Module()
