"""The scale-hyperprior photo codec (Ballé et al. 2018, "bmshj2018-hyperprior"): training and export.

    latentpack train --arch hyperprior --input 'photos/*.jpg' --input-format images \
        --quality 4 --steps 8000 --init-from photo-q4-checkpoints --model-dir photo-q4/

The image transforms are the spatial family's (`families.spatial.transforms`); on top
of them a hyper-analysis summarizes |y| into side information z at 1/64 of the image size,
coded with a per-channel non-parametric prior, and a hyper-synthesis predicts from z the
scale of a zero-mean Gaussian for every latent. Rates: bits(y | sigma) + bits(z).

Determinism policy (the table chosen for each latent must be the same on any machine).
Training is in floating point. At export the hyper-synthesis is frozen into an INTEGER
network (`families.hyperprior.codec.IntegerHyperSynthesis`): integer kernels of at most
12 bits, integer biases, activations rounded down to at most 16 bits after every layer,
and the Gaussian table index computed from the last layer's integer output by integer
division. Every product and partial sum is an integer below 2**53, so evaluating it with
float64 matrix products is exact whatever the summation order, thread count or BLAS;
encoder and decoder therefore choose bit-identical tables. The Gaussian tables themselves
(64 log-spaced scales from 0.11 to 64) are integers in codec.json.
"""
from __future__ import annotations

from typing import List

import numpy as np

from families.spatial import transforms
from pipeline.errors import log
from training.loop import PhotoConfig, PhotoTrainer, check_args, main as loop_main  # noqa: F401  (check_args: train's)

SCALE_MIN, SCALE_MAX, SCALE_LEVELS = 0.11, 64.0, 64
# Symbols of the Gaussian table for scale s: [-R, R], R = ceil(TAIL_SIGMAS * s) within [MIN_RADIUS, MAX_RADIUS].
TAIL_SIGMAS, MIN_RADIUS, MAX_RADIUS = 6.0, 16, 511
WEIGHT_BITS, ACTIVATION_BITS = 12, 16
# Distance between neighbouring tables' log-scales.
LOG_SCALE_STEP = (np.log(SCALE_MAX) - np.log(SCALE_MIN)) / (SCALE_LEVELS - 1)


def build_hyper_transforms(filters: int, latent_channels: int):
    """(hyper_analysis, hyper_synthesis): |y| -> z at 1/4 of the latent grid; z -> log-scales of y."""
    import keras
    from keras import layers

    hyper_analysis = keras.Sequential([
        keras.Input((None, None, latent_channels)),
        layers.Conv2D(filters, 3, padding="same", activation="relu", name="hconv0"),
        layers.Conv2D(filters, 5, strides=2, padding="same", activation="relu", name="hconv1"),
        layers.Conv2D(filters, 5, strides=2, padding="same", name="hconv2"),
    ], name="hyper_analysis")
    hyper_synthesis = keras.Sequential([
        keras.Input((None, None, filters)),
        layers.Conv2DTranspose(filters, 5, strides=2, padding="same", activation="relu", name="hdeconv0"),
        layers.Conv2DTranspose(filters, 5, strides=2, padding="same", activation="relu", name="hdeconv1"),
        layers.Conv2DTranspose(latent_channels, 3, strides=1, padding="same", name="hdeconv2"),
    ], name="hyper_synthesis")
    return hyper_analysis, hyper_synthesis


def gaussian_bits(y, log_scale):
    """Bits of each value of y (noisy or integer) under a zero-mean Gaussian of scale exp(log_scale)
    integrated over [y - 0.5, y + 0.5]; scales clipped to the tables' range."""
    import tensorflow as tf

    scale = tf.exp(tf.clip_by_value(log_scale, float(np.log(SCALE_MIN)), float(np.log(SCALE_MAX))))
    v = tf.abs(y)
    # Upper tail difference, where both terms are small: stable far from zero.
    c = 1.0 / (scale * float(np.sqrt(2.0)))
    p = 0.5 * (tf.math.erfc((v - 0.5) * c) - tf.math.erfc((v + 0.5) * c))
    return -tf.math.log(tf.maximum(p, 1e-9)) / float(np.log(2.0))


def pad_grid(y, multiple: int = 4):
    """Edge-pad a latent tensor [N, h, w, C] to multiples of `multiple` (what the hyper-analysis sees)."""
    import tensorflow as tf

    shape = tf.shape(y)
    ph, pw = (-shape[1]) % multiple, (-shape[2]) % multiple
    y = tf.concat([y, tf.repeat(y[:, -1:], ph, axis=1)], axis=1)
    return tf.concat([y, tf.repeat(y[:, :, -1:], pw, axis=2)], axis=2)


class HyperpriorTrainer(PhotoTrainer):
    """Variables, optimizer, step and checkpoint of a hyperprior model."""

    def build(self, config: PhotoConfig) -> dict:
        from training.prior import DeepFactorizedPrior

        analysis, synthesis = transforms.build_transforms(config.filters, config.latent_channels, stride=config.stride)
        hyper_analysis, hyper_synthesis = build_hyper_transforms(config.filters, config.latent_channels)
        return {"analysis": analysis, "synthesis": synthesis, "hyper_analysis": hyper_analysis,
                "hyper_synthesis": hyper_synthesis, "prior": DeepFactorizedPrior(config.filters, name="hyper_prior")}

    def losses(self, x):
        import tensorflow as tf

        y = self.analysis(x, training=True)
        # The decoder and the hyper-analysis see the rounded latents the codec has (straight-through).
        y_hat = y + tf.stop_gradient(tf.round(y) - y)
        z = self.hyper_analysis(tf.abs(pad_grid(y_hat)), training=True)
        noisy_y = y + tf.random.uniform(tf.shape(y), -0.5, 0.5)
        z_hat = z + tf.random.uniform(tf.shape(z), -0.5, 0.5)
        log_scale = self.hyper_synthesis(z_hat, training=True)[:, :tf.shape(y)[1], :tf.shape(y)[2]]
        x_hat = self.synthesis(y_hat, training=True)
        mse = tf.reduce_mean(tf.square(x - x_hat))
        pixels = tf.cast(tf.reduce_prod(tf.shape(x)[1:3]), tf.float32)
        bits = tf.reduce_sum(gaussian_bits(noisy_y, log_scale), axis=[1, 2, 3]) + self.prior.bits(z_hat)
        return mse, tf.reduce_mean(bits) / pixels

    def bits(self, y) -> float:
        """Estimated bits of one image's rounded latents [1, h, w, M]: y given z, and z."""
        import tensorflow as tf

        z = tf.round(self.hyper_analysis(tf.abs(pad_grid(y)), training=False))
        log_scale = self.hyper_synthesis(z, training=False)[:, :y.shape[1], :y.shape[2]]
        return float(tf.reduce_sum(gaussian_bits(y, log_scale)) + self.prior.bits(z)[0])

    def export(self, model_dir: str, holdout, history: dict, extra: dict) -> dict:
        return export(self, model_dir, holdout, history, extra)


def HyperpriorModule(weights: dict, hyper_weights: list, integer: dict, latent_channels: int, hyper_channels: int,
                     storage: str = transforms.KERNEL_STORAGE):
    """The spatial module (encode/decode signatures) plus `hyper_encode` (int16 latents [N, h, w, M]
    -> int16 side information [N, ceil(h/4), ceil(w/4), N]) and the integer hyper-synthesis
    weights as int16 kernels / int64 biases (`hyper_kernels`, `hyper_biases`)."""
    import tensorflow as tf

    module = transforms.SpatialModule(weights, latent_channels, storage)
    module.hyper_analysis = [(*transforms.stored_kernel(k, storage, f"hyper_analysis{i}_k"),
                              tf.Variable(b.astype(np.float32), trainable=False, name=f"hyper_analysis{i}_b"), s)
                             for i, (k, b, s) in enumerate(hyper_weights)]
    module.hyper_kernels = [tf.Variable(layer["kernel"].astype(np.int16), trainable=False, name=f"hyper_synthesis{i}_k")
                            for i, layer in enumerate(integer["layers"])]
    module.hyper_biases = [tf.Variable(layer["bias"].astype(np.int64), trainable=False, name=f"hyper_synthesis{i}_b")
                           for i, layer in enumerate(integer["layers"])]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, latent_channels], tf.int16, name="latent")])
    def hyper_encode(latent):
        y = tf.abs(tf.cast(latent, tf.float32))
        shape = tf.shape(y)
        ph, pw = (-shape[1]) % 4, (-shape[2]) % 4
        y = tf.concat([y, tf.repeat(y[:, -1:], ph, axis=1)], axis=1)
        y = tf.concat([y, tf.repeat(y[:, :, -1:], pw, axis=2)], axis=2)
        for i, (kernel, scale, bias, stride) in enumerate(module.hyper_analysis):
            y = tf.nn.conv2d(y, transforms.dequantize(kernel, scale, tf.float32), strides=stride, padding="SAME") + bias
            if i < len(module.hyper_analysis) - 1:
                y = tf.nn.relu(y)
        return {"hyper": tf.cast(tf.clip_by_value(tf.round(y), -32767.0, 32767.0), tf.int16)}

    module.hyper_encode = hyper_encode
    return module


# --- export -----------------------------------------------------------------------------------

def gaussian_tables() -> dict:
    """Integer tables for SCALE_LEVELS log-spaced scales (offset -R, frequencies of -R..R)."""
    from scipy.special import ndtr

    from training.prior import PRECISION, quantize_pmf

    scales = np.exp(np.linspace(np.log(SCALE_MIN), np.log(SCALE_MAX), SCALE_LEVELS))
    offsets, tables = [], []
    for s in scales:
        radius = int(min(MAX_RADIUS, max(MIN_RADIUS, np.ceil(TAIL_SIGMAS * s))))
        k = np.arange(-radius, radius + 1, dtype=np.float64)
        pmf = ndtr((k + 0.5) / s) - ndtr((k - 0.5) / s)
        pmf[0] += ndtr((-radius - 0.5) / s)  # the tails, folded into the end symbols (values are clipped)
        pmf[-1] += ndtr((-radius - 0.5) / s)
        offsets.append(-radius)
        tables.append(quantize_pmf(np.maximum(pmf, 1e-300)).tolist())
    return {"precision": PRECISION, "scales": scales.tolist(), "offsets": offsets, "frequencies": tables}


def integer_hyper_synthesis(hyper_synthesis, calibration: List[np.ndarray]) -> dict:
    """Freeze the hyper-synthesis into the integer network of the determinism policy.

    Per layer: kernel * 2**k rounded (|kernel| <= 2**WEIGHT_BITS), bias at the accumulator's
    scale, and the right shift that brings the (ReLU'd) accumulator to the next layer's
    activation precision, chosen from the largest activation seen on `calibration` (z tensors)
    with 2x headroom; activations saturate at 2**ACTIVATION_BITS - 1. The last layer's
    accumulator is mapped to a table index by integer arithmetic (`index_offset`, `index_step`).
    """
    layers = hyper_synthesis.layers
    kernels = [np.asarray(layer.kernel, np.float64) for layer in layers]
    biases = [np.asarray(layer.bias, np.float64) for layer in layers]
    # Float activations of each layer on the calibration set (ReLU'd for hidden layers).
    peaks = [0.0] * len(layers)
    for z in calibration:
        x = z
        for i, layer in enumerate(layers):
            x = layer(x).numpy()
            peaks[i] = max(peaks[i], float(np.abs(x).max()))
    frac = 0  # fractional bits of the current layer's input (z is an integer: 0)
    out = []
    for i, (kernel, bias) in enumerate(zip(kernels, biases)):
        wbits = int(np.floor(WEIGHT_BITS - np.log2(max(np.abs(kernel).max(), 1e-12))))
        wbits = min(wbits, 24)
        k_int = np.clip(np.round(kernel * 2.0 ** wbits), -(2 ** WEIGHT_BITS), 2 ** WEIGHT_BITS).astype(np.int64)
        acc_bits = frac + wbits
        b_int = np.round(bias * 2.0 ** acc_bits).astype(np.int64)
        layer = {"kernel": k_int, "bias": b_int, "stride": int(layers[i].strides[0]),
                 "relu": i < len(layers) - 1}
        if i < len(layers) - 1:
            next_frac = int(np.floor(np.log2((2 ** ACTIVATION_BITS - 1) / max(2.0 * peaks[i], 1e-6))))
            next_frac = min(next_frac, acc_bits)
            layer["shift"] = acc_bits - next_frac
            frac = next_frac
        else:
            delta = LOG_SCALE_STEP
            # index = round((u - log SCALE_MIN) / delta) = floor((acc - offset) / step)
            layer["index_offset"] = int(np.round((np.log(SCALE_MIN) - delta / 2) * 2.0 ** acc_bits))
            layer["index_step"] = int(np.round(delta * 2.0 ** acc_bits))
        out.append(layer)
    return {"layers": out}


def export(trainer: HyperpriorTrainer, model_dir: str, holdout, history: dict, extra: dict) -> dict:
    """Freeze the priors and the integer hyper-synthesis; write the SavedModel and codec.json."""
    import tensorflow as tf

    from families.hyperprior.codec import entropy_model_spec
    from training.data import random_crops
    from training.export import artifact_spec, write_photo_artifact
    from training.prior import freeze_channels

    config = trainer.config
    z_tables = freeze_channels(trainer.prior)
    # Activation ranges of the integer hyper-synthesis, from training crops (never the held-out images).
    crops = random_crops(extra["input"], extra["input_format"], config, config.seed + 1)
    calibration = []
    for _ in range(8):
        y = tf.round(trainer.analysis(np.stack([next(crops) for _ in range(16)]), training=False))
        calibration.append(tf.round(trainer.hyper_analysis(tf.abs(pad_grid(y)), training=False)).numpy())
    integer = integer_hyper_synthesis(trainer.hyper_synthesis, calibration)
    weights = transforms.transform_weights(trainer.analysis, trainer.synthesis)
    hyper_weights = [(np.asarray(layer.kernel), np.asarray(layer.bias), int(layer.strides[0]))
                     for layer in trainer.hyper_analysis.layers]
    module = HyperpriorModule(weights, hyper_weights, integer, config.latent_channels, config.filters,
                              config.kernel_storage)
    entropy_model = entropy_model_spec(z_tables, gaussian_tables(), integer)
    spec = dict(artifact_spec(trainer, "hyperprior", "scale-hyperprior-integer", entropy_model, history, extra),
                hyper_channels=config.filters)
    spec = write_photo_artifact(model_dir, module, ("encode", "decode", "hyper_encode"), spec, history, holdout)
    log.info("held-out: %.2f dB at %.3f bpp (real codes)", spec["metrics"].get("val_psnr", 0),
             spec["metrics"].get("val_bpp", 0))
    return spec


TRAINER = HyperpriorTrainer


def main(args) -> int:
    return loop_main(args, "hyperprior")
