"""The channel-conditional photo codec (Minnen & Singh 2020, "ms2020"): training.

    latentpack train --arch channelwise --input 'photos/*.png' --input-format images \
        --quality 4 --steps 40000 --init-from photo:4 --model-dir photo-q4/

The image transforms are the spatial family's. The entropy model is a mean-scale hyperprior
with a channel-wise autoregressive context: the hyper-analysis summarizes the (signed) latents
into side information z; the hyper-synthesis turns z into features; the latent channels are cut
into `slices`, and a small convolutional network per slice predicts the mean and scale of that
slice's latents from the features and every slice decoded before it. Within a slice every
position is coded in parallel, so the decoder runs `slices` networks in sequence, each over the
whole latent grid.

Latents stay integers (the decoder sees round(y), as with the other photo families); the mean
moves the Gaussian each integer is coded with. Rates: bits(y | mean, scale) + bits(z).

The design is a scale hyperprior plus residuals, so that a trained scale-hyperprior model (a
shipped `photo:<q>`) is exactly where training starts (`from_hyperprior`): the hyper-analysis
reads [y, |y|] (the scale hyperprior's weights on |y|, zeros on y); the hyper-synthesis gives M
mean features (zero) and M log-scale features (the scale hyperprior's); each slice's context
network adds a correction to both, its last layer starting at zero. New capacity then only
ever starts from what the trained model already does.
"""
from __future__ import annotations

from typing import List

import numpy as np

from families.hyperprior.train import SCALE_MAX, SCALE_MIN, pad_grid
from families.spatial import transforms
from pipeline.errors import log
from training.loop import PhotoTrainer, check_args, main as loop_main  # noqa: F401  (check_args: train's)


def slice_sizes(latent_channels: int, slices: int) -> List[int]:
    """The channels of each slice: as equal as the division allows, larger slices last."""
    base, extra = divmod(latent_channels, slices)
    return [base + (1 if i >= slices - extra else 0) for i in range(slices)]


def build_hyper_transforms(filters: int, latent_channels: int):
    """(hyper_analysis, hyper_synthesis): [y, |y|] -> z at 1/4 of the latent grid; z -> [M mean
    features, M log-scale features]."""
    import keras
    from keras import layers

    hyper_analysis = keras.Sequential([
        keras.Input((None, None, 2 * latent_channels)),
        layers.Conv2D(filters, 3, padding="same", activation="relu", name="hconv0"),
        layers.Conv2D(filters, 5, strides=2, padding="same", activation="relu", name="hconv1"),
        layers.Conv2D(filters, 5, strides=2, padding="same", name="hconv2"),
    ], name="hyper_analysis")
    hyper_synthesis = keras.Sequential([
        keras.Input((None, None, filters)),
        layers.Conv2DTranspose(filters, 5, strides=2, padding="same", activation="relu", name="hdeconv0"),
        layers.Conv2DTranspose(filters, 5, strides=2, padding="same", activation="relu", name="hdeconv1"),
        layers.Conv2DTranspose(2 * latent_channels, 3, strides=1, padding="same", name="hdeconv2"),
    ], name="hyper_synthesis")
    return hyper_analysis, hyper_synthesis


def build_context(features: int, sizes: List[int], filters: int):
    """One network per slice: [features + channels of the slices before it] -> corrections of the
    slice's [mean, log-scale] features (its last layer starts at zero: no correction)."""
    import keras
    from keras import layers

    nets, before = [], 0
    for i, size in enumerate(sizes):
        nets.append(keras.Sequential([
            keras.Input((None, None, features + before)),
            layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"cc{i}conv0"),
            layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"cc{i}conv1"),
            layers.Conv2D(2 * size, 3, padding="same", kernel_initializer="zeros", name=f"cc{i}conv2"),
        ], name=f"context{i}"))
        before += size
    return nets


def gaussian_bits(y, mean, log_scale):
    """Bits of each value of y (noisy or integer) under a Gaussian of that mean and scale
    exp(log_scale) integrated over [y - 0.5, y + 0.5]; scales clipped to the tables' range."""
    import tensorflow as tf

    scale = tf.exp(tf.clip_by_value(log_scale, float(np.log(SCALE_MIN)), float(np.log(SCALE_MAX))))
    v = tf.abs(y - mean)
    c = 1.0 / (scale * float(np.sqrt(2.0)))
    p = 0.5 * (tf.math.erfc((v - 0.5) * c) - tf.math.erfc((v + 0.5) * c))
    return -tf.math.log(tf.maximum(p, 1e-9)) / float(np.log(2.0))


def hyper_input(y):
    """What the hyper-analysis reads: [y, |y|] (signs for the means, magnitudes for the scales)."""
    import tensorflow as tf

    return tf.concat([y, tf.abs(y)], axis=-1)


def from_hyperprior(weights: dict) -> dict:
    """A scale-hyperprior model's weights (`training.weights`: a shipped photo:<q>, say) as the
    start of a channelwise model that computes the same: the same transforms; the hyper-analysis
    reading |y| as before and y through zero weights; the hyper-synthesis giving zero mean features
    and the same log-scales; the side information's density as it was. The context networks are
    left to their initialization (their last layers at zero)."""
    out = dict(weights)
    kernel = weights["hyper_analysis/hconv0/kernel"]  # [3, 3, M, N]
    out["hyper_analysis/hconv0/kernel"] = np.concatenate([np.zeros_like(kernel), kernel], axis=2)
    kernel, bias = weights["hyper_synthesis/hdeconv2/kernel"], weights["hyper_synthesis/hdeconv2/bias"]  # [3, 3, M, N]
    out["hyper_synthesis/hdeconv2/kernel"] = np.concatenate([np.zeros_like(kernel), kernel], axis=2)
    out["hyper_synthesis/hdeconv2/bias"] = np.concatenate([np.zeros_like(bias), bias])
    return out


def start_from(weights: dict, family: str) -> dict:
    """Another family's weights as this family's start point (`training.weights.from_model`)."""
    if family != "hyperprior":
        from pipeline.errors import LatentpackError

        raise LatentpackError(f"a channelwise model starts from a hyperprior model's weights, not a {family} one's")
    return from_hyperprior(weights)


class ChannelwiseTrainer(PhotoTrainer):
    """Variables, optimizer, step and checkpoint of a channel-conditional model."""

    def build(self, config) -> dict:
        from training.prior import DeepFactorizedPrior

        self.sizes = slice_sizes(config.latent_channels, config.slices)
        analysis, synthesis = transforms.build_transforms(config.filters, config.latent_channels, stride=config.stride)
        hyper_analysis, hyper_synthesis = build_hyper_transforms(config.filters, config.latent_channels)
        parts = {"analysis": analysis, "synthesis": synthesis, "hyper_analysis": hyper_analysis,
                 "hyper_synthesis": hyper_synthesis,
                 "prior": DeepFactorizedPrior(config.filters, name="hyper_prior")}
        for i, net in enumerate(build_context(2 * config.latent_channels, self.sizes, config.context_filters)):
            parts[f"context{i}"] = net
        return parts

    @property
    def contexts(self):
        return [self.parts[f"context{i}"] for i in range(len(self.sizes))]

    def entropy_parameters(self, features, y_hat):
        """(mean, log_scale) of every latent [N, h, w, M], slice after slice: each slice's features
        plus the correction its context network computes from all features and the (rounded)
        slices before it."""
        import tensorflow as tf

        m = self.config.latent_channels
        means, scales, start = [], [], 0
        for size, net in zip(self.sizes, self.contexts):
            out = net(tf.concat([features, y_hat[..., :start]], axis=-1) if start else features)
            means.append(features[..., start:start + size] + out[..., :size])
            scales.append(features[..., m + start:m + start + size] + out[..., size:])
            start += size
        return tf.concat(means, axis=-1), tf.concat(scales, axis=-1)

    def rate(self, y, pixels):
        import tensorflow as tf

        # The hyper-analysis and the context see the rounded latents the codec has.
        y_hat = y + tf.stop_gradient(tf.round(y) - y)
        z = self.hyper_analysis(hyper_input(pad_grid(y_hat)), training=True)
        z_noisy = z + tf.random.uniform(tf.shape(z), -0.5, 0.5)
        features = self.hyper_synthesis(z_noisy, training=True)[:, :tf.shape(y)[1], :tf.shape(y)[2]]
        mean, log_scale = self.entropy_parameters(features, y_hat)
        noisy_y = y + tf.random.uniform(tf.shape(y), -0.5, 0.5)
        bits = tf.reduce_sum(gaussian_bits(noisy_y, mean, log_scale), axis=[1, 2, 3]) + self.prior.bits(z_noisy)
        return tf.reduce_mean(bits) / pixels

    def losses(self, x):
        import tensorflow as tf

        y = self.analysis(x, training=True)
        # The decoder sees the rounded latents (straight through).
        x_hat = self.synthesis(y + tf.stop_gradient(tf.round(y) - y), training=True)
        mse = tf.reduce_mean(tf.square(x - x_hat))
        return mse, self.rate(y, tf.cast(tf.reduce_prod(tf.shape(x)[1:3]), tf.float32))

    def bits(self, y) -> float:
        """Estimated bits of one image's rounded latents [1, h, w, M]: y given z, and z."""
        import tensorflow as tf

        z = tf.round(self.hyper_analysis(hyper_input(pad_grid(y)), training=False))
        features = self.hyper_synthesis(z, training=False)[:, :y.shape[1], :y.shape[2]]
        mean, log_scale = self.entropy_parameters(features, y)
        return float(tf.reduce_sum(gaussian_bits(y, mean, log_scale)) + self.prior.bits(z)[0])

    def export(self, model_dir: str, holdout, history: dict, extra: dict) -> dict:
        return export(self, model_dir, holdout, history, extra)


# --- export -----------------------------------------------------------------------------------

MEAN_LEVELS = 8  # the Gaussian tables per scale: the mean's fraction in steps of 1/MEAN_LEVELS
# Kernels of the integer networks: int8 (7 bits and a sign; 6 bits coded as well: models/README.md).
WEIGHT_BITS = 7


def gaussian_tables(levels: int = MEAN_LEVELS) -> dict:
    """Integer tables for SCALE_LEVELS log-spaced scales x `levels` mean fractions: table
    s * levels + f codes k - centre for a Gaussian of scale s and mean centre + (f - levels/2) / levels."""
    from scipy.special import ndtr

    from families.hyperprior.train import MAX_RADIUS, MIN_RADIUS, SCALE_LEVELS, TAIL_SIGMAS
    from training.prior import PRECISION, quantize_pmf

    scales = np.exp(np.linspace(np.log(SCALE_MIN), np.log(SCALE_MAX), SCALE_LEVELS))
    offsets, tables = [], []
    for s in scales:
        radius = int(min(MAX_RADIUS, max(MIN_RADIUS, np.ceil(TAIL_SIGMAS * s))))
        k = np.arange(-radius, radius + 1, dtype=np.float64)
        for f in range(levels):
            d = (f - levels // 2) / levels
            pmf = ndtr((k + 0.5 - d) / s) - ndtr((k - 0.5 - d) / s)
            pmf[0] += ndtr((-radius - 0.5 - d) / s)  # the tails, folded into the end symbols (values are clipped)
            pmf[-1] += 1.0 - ndtr((radius + 0.5 - d) / s)
            offsets.append(-radius)
            tables.append(quantize_pmf(np.maximum(pmf, 1e-300)).tolist())
    return {"precision": PRECISION, "scales": scales.tolist(), "mean_levels": levels, "offsets": offsets,
            "frequencies": tables}


def _kernel(layer) -> np.ndarray:
    """A Keras convolution's kernel as [K, K, Cin, Cout] (transposed ones store [K, K, Cout, Cin])."""
    k = np.asarray(layer.kernel, np.float64)
    return k.transpose(0, 1, 3, 2) if "Transpose" in type(layer).__name__ else k


def integer_network(layers, input_bits: int, peaks: List[float], input_peaks: np.ndarray, last: str,
                    weight_bits: int = WEIGHT_BITS) -> tuple:
    """Freeze Keras convolutions into the exact integer network of `pipeline.integer`.

    `input_bits`: the fractional bits of the input (an integer input x stands for x / 2**bits);
    `peaks`: the largest float activation each layer gave on calibration data; `input_peaks`: the
    bound the decoder clips each input channel to. Each output channel's kernel is rounded to
    `weight_bits` bits and a sign (its largest value near 2**weight_bits - 1), its accumulator's
    fractional bits following from that; hidden layers then shift down to 16-bit activations with
    2x headroom over their calibration peak. `last`: "features" (the last layer also shifts, keeping its sign) or
    "accumulators" (it does not). Returns (layer descriptions, integer kernels in Keras' layouts,
    biases, accumulator bits of the last layer per output channel, fractional bits of the output)."""
    from pipeline.integer import ACTIVATION_LIMIT, EXACT

    metas, kernels, biases = [], [], []
    bits_in = int(input_bits)
    bound_in = np.asarray(input_peaks, np.float64)
    for i, layer in enumerate(layers):
        k = _kernel(layer)  # [K, K, Cin, Cout]
        b = np.asarray(layer.bias, np.float64)
        top, limit = np.abs(k).max(axis=(0, 1, 2)), 2 ** weight_bits - 1
        # (A channel of zeros -- a context network's untrained last layer -- gets 30 bits.)
        wbits = np.minimum(np.floor(np.log2(limit / np.maximum(top, 1e-30))), 30).astype(np.int64)
        k_int = np.round(k * 2.0 ** wbits[None, None, None, :]).astype(np.int64)
        while (np.abs(k_int) > limit).any():  # rounding up past the limit
            over = (np.abs(k_int) > limit).any(axis=(0, 1, 2))
            wbits[over] -= 1
            k_int = np.round(k * 2.0 ** wbits[None, None, None, :]).astype(np.int64)
        acc_bits = bits_in + wbits
        reach = (np.abs(k_int) * bound_in[None, None, :, None]).sum(axis=(0, 1, 2))
        if (reach + np.abs(b * 2.0 ** acc_bits)).max() >= EXACT / 4:
            raise ValueError("an integer network's sums would leave the exact range")
        b_int = np.round(b * 2.0 ** acc_bits).astype(np.int64)
        transpose = "Transpose" in type(layer).__name__
        meta = {"stride": int(layer.strides[0]), "transpose": transpose,
                "relu": layer.activation.__name__ == "relu"}
        if i < len(layers) - 1 or last == "features":
            out_bits = int(np.floor(np.log2(ACTIVATION_LIMIT / max(2.0 * peaks[i], 1e-6))))
            out_bits = min(out_bits, int(acc_bits.min()))
            meta["shift"] = (acc_bits - out_bits).tolist()
            bits_in = out_bits
            bound_in = np.full(k.shape[3], float(ACTIVATION_LIMIT))
        stored = k_int.transpose(0, 1, 3, 2) if transpose else k_int
        meta["kernel_shape"] = list(stored.shape)
        metas.append(meta)
        kernels.append(stored)
        biases.append(b_int)
    return metas, kernels, biases, acc_bits, bits_in


def _calibration(trainer, crops) -> dict:
    """Peaks of every layer of the hyper-synthesis and the context networks on training crops:
    {"hyper_synthesis": [peak per layer], "context": [[peak per layer] per slice]}."""
    import tensorflow as tf

    hyper = [0.0] * len(trainer.hyper_synthesis.layers)
    context = [[0.0] * len(net.layers) for net in trainer.contexts]
    for x in crops:
        y = tf.round(trainer.analysis(x, training=False))
        z = tf.round(trainer.hyper_analysis(hyper_input(pad_grid(y)), training=False))
        h = z
        for i, layer in enumerate(trainer.hyper_synthesis.layers):
            h = layer(h)
            hyper[i] = max(hyper[i], float(tf.reduce_max(tf.abs(h))))
        features = h[:, :y.shape[1], :y.shape[2]]
        start = 0
        for s, (size, net) in enumerate(zip(trainer.sizes, trainer.contexts)):
            a = tf.concat([features, y[..., :start]], axis=-1) if start else features
            for i, layer in enumerate(net.layers):
                a = layer(a)
                context[s][i] = max(context[s][i], float(tf.reduce_max(tf.abs(a))))
            start += size
    return {"hyper_synthesis": hyper, "context": context}


def freeze_entropy_model(trainer, z_tables: dict, calibration: dict) -> tuple:
    """codec.json's entropy_model and the integer kernels and biases, in their order."""
    from families.channelwise.codec import LATENT_LIMIT
    from pipeline.integer import ACTIVATION_LIMIT
    from families.hyperprior.train import LOG_SCALE_STEP

    filters, m = trainer.config.filters, trainer.config.latent_channels
    hyper, kernels, biases, _, feature_bits = integer_network(
        trainer.hyper_synthesis.layers, 0, calibration["hyper_synthesis"], np.full(filters, float(LATENT_LIMIT)),
        last="features")
    context, before = [], 0
    for size, net, peaks in zip(trainer.sizes, trainer.contexts, calibration["context"]):
        # The decoded latents enter at the features' fixed point (shifted left by feature_bits).
        bounds = np.concatenate([np.full(2 * m, float(ACTIVATION_LIMIT)),
                                 np.full(before, float(LATENT_LIMIT) * 2.0 ** feature_bits)])
        layers, k, b, acc_bits, _ = integer_network(net.layers, feature_bits, peaks, bounds, last="accumulators")
        mean_bits, scale_bits = acc_bits[:size], acc_bits[size:]
        if (mean_bits <= MEAN_LEVELS.bit_length()).any():
            raise ValueError("a context network's mean outputs are too coarse for the integer mapping")
        layers[-1]["mean_bits"] = mean_bits.tolist()
        layers[-1]["scale_bits"] = scale_bits.tolist()
        layers[-1]["index_offset"] = [int(np.round((np.log(SCALE_MIN) - LOG_SCALE_STEP / 2) * 2.0 ** a))
                                      for a in scale_bits]
        layers[-1]["index_step"] = [int(np.round(LOG_SCALE_STEP * 2.0 ** a)) for a in scale_bits]
        context.append(layers)
        kernels += k
        biases += b
        before += size
    model = {"kind": "channelwise-mean-scale", "precision": z_tables["precision"], "feature_bits": feature_bits,
             "hyper": {"precision": z_tables["precision"], "offsets": z_tables["offsets"],
                       "frequencies": z_tables["frequencies"]},
             "gaussian": gaussian_tables(), "slices": list(trainer.sizes),
             "hyper_synthesis": hyper, "context": context}
    return model, kernels, biases


def ChannelwiseModule(weights: dict, hyper_weights: list, kernels, biases, latent_channels: int,
                      storage: str = transforms.KERNEL_STORAGE):
    """The spatial module (encode/decode signatures) plus `hyper_encode` (int16 latents [N, h, w, M]
    -> int16 side information [N, ceil(h/4), ceil(w/4), N]) and the integer networks' kernels
    (int8) and biases (int64), hyper-synthesis first, then each slice's
    context network."""
    import tensorflow as tf

    module = transforms.SpatialModule(weights, latent_channels, storage)
    module.hyper_analysis = [(*transforms.stored_kernel(k, storage, f"hyper_analysis{i}_k"),
                              tf.Variable(b.astype(np.float32), trainable=False, name=f"hyper_analysis{i}_b"), s)
                             for i, (k, b, s) in enumerate(hyper_weights)]
    module.integer_kernels = [tf.Variable(k.astype(np.int8), trainable=False, name=f"integer{i}_k")
                              for i, k in enumerate(kernels)]
    module.integer_biases = [tf.Variable(b.astype(np.int64), trainable=False, name=f"integer{i}_b")
                             for i, b in enumerate(biases)]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, latent_channels], tf.int16, name="latent")])
    def hyper_encode(latent):
        y = tf.cast(latent, tf.float32)
        shape = tf.shape(y)
        ph, pw = (-shape[1]) % 4, (-shape[2]) % 4
        y = tf.concat([y, tf.repeat(y[:, -1:], ph, axis=1)], axis=1)
        y = tf.concat([y, tf.repeat(y[:, :, -1:], pw, axis=2)], axis=2)
        y = tf.concat([y, tf.abs(y)], axis=-1)
        for i, (kernel, scale, bias, stride) in enumerate(module.hyper_analysis):
            y = tf.nn.conv2d(y, transforms.dequantize(kernel, scale, tf.float32), strides=stride, padding="SAME") + bias
            if i < len(module.hyper_analysis) - 1:
                y = tf.nn.relu(y)
        return {"hyper": tf.cast(tf.clip_by_value(tf.round(y), -32767.0, 32767.0), tf.int16)}

    module.hyper_encode = hyper_encode
    return module


def export(trainer: ChannelwiseTrainer, model_dir: str, holdout, history: dict, extra: dict) -> dict:
    """Freeze the side information's density, the integer networks and the tables; write the
    SavedModel and codec.json; measure the held-out photos through the pipeline's own codec."""
    from training.data import random_crops
    from training.export import artifact_spec, write_photo_artifact
    from training.prior import freeze_channels

    config = trainer.config
    z_tables = freeze_channels(trainer.prior)
    # Activation ranges of the integer networks, from training crops (never the held-out images).
    crops = random_crops(extra["input"], extra["input_format"], config, config.seed + 1)
    calibration = _calibration(trainer, [np.stack([next(crops) for _ in range(16)]) for _ in range(8)])
    entropy_model, kernels, biases = freeze_entropy_model(trainer, z_tables, calibration)
    weights = transforms.transform_weights(trainer.analysis, trainer.synthesis)
    hyper_weights = [(np.asarray(layer.kernel), np.asarray(layer.bias), int(layer.strides[0]))
                     for layer in trainer.hyper_analysis.layers]
    module = ChannelwiseModule(weights, hyper_weights, kernels, biases, config.latent_channels, config.kernel_storage)
    spec = dict(artifact_spec(trainer, "channelwise", "channelwise-mean-scale-integer", entropy_model, history, extra),
                hyper_channels=config.filters)
    spec["architecture"] = dict(spec["architecture"], slices=list(trainer.sizes),
                                context_filters=config.context_filters)
    spec = write_photo_artifact(model_dir, module, ("encode", "decode", "hyper_encode"), spec, history, holdout)
    log.info("held-out: %.2f dB at %.3f bpp (real codes)", spec["metrics"].get("val_psnr", 0),
             spec["metrics"].get("val_bpp", 0))
    return spec


TRAINER = ChannelwiseTrainer


def main(args) -> int:
    return loop_main(args, "channelwise")
