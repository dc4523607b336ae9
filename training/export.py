"""Freeze a trained encoder/decoder into the model artifact the pipeline loads.

Quantization ranges are fitted once here on training latents and baked into the
SavedModel's `encode`/`decode` signatures, so the signature is the file format.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from pipeline.artifact import CODEC_FILE, FORMAT, FORMAT_VERSION, compute_fingerprint, validate_spec
from pipeline.images import psnr


def fit_quantization(latents: np.ndarray, bits: int, tail: float = 0.05) -> dict:
    """Per-dimension uniform quantizer covering the central (100 - 2*tail)% of training latents."""
    low = np.percentile(latents, tail, axis=0)
    high = np.percentile(latents, 100 - tail, axis=0)
    levels = 2 ** bits
    step = np.maximum((high - low) / (levels - 1), 1e-6)
    return {"kind": "uniform", "bits": bits, "low": low.astype(float).tolist(), "step": step.astype(float).tolist()}


def latent_dtype(bits: int) -> str:
    return "int8" if bits <= 8 else "int16"


class CodecModule(tf.Module):
    """encode: uint8 images -> signed integer latents; decode: the reverse."""

    def __init__(self, encoder, decoder, image_shape, quantization):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        bits = quantization["bits"]
        self._dtype = tf.int8 if latent_dtype(bits) == "int8" else tf.int16
        self._low = tf.constant(quantization["low"], tf.float32)
        self._step = tf.constant(quantization["step"], tf.float32)
        self._half = float(2 ** (bits - 1))
        d = len(quantization["low"])
        self.encode = tf.function(self._encode, input_signature=[
            tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([None, d], self._dtype, name="latent")])

    def _encode(self, images):
        z = self.encoder(tf.cast(images, tf.float32) / 255.0, training=False)
        q = tf.round((z - self._low) / self._step) - self._half
        q = tf.clip_by_value(q, -self._half, self._half - 1)
        return {"latent": tf.cast(q, self._dtype)}

    def _decode(self, latent):
        z = (tf.cast(latent, tf.float32) + self._half) * self._step + self._low
        x = self.decoder(z, training=False)
        return {"image": tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)}


def export(model_dir: str, encoder, decoder, image_shape, quantization: dict, spec: dict,
           val_images: np.ndarray) -> dict:
    """Write the SavedModel and codec.json; returns the final spec (with fingerprint, val PSNR)."""
    module = CodecModule(encoder, decoder, tuple(image_shape), quantization)
    metrics = {}
    if len(val_images):
        recon = np.concatenate([
            module.decode(module.encode(val_images[i:i + 1024])["latent"])["image"].numpy()
            for i in range(0, len(val_images), 1024)])
        scores = psnr(val_images, recon)
        metrics = {"val_psnr": float(scores.mean()), "val_psnr_min": float(scores.min()),
                   "val_images": int(len(val_images))}
    os.makedirs(model_dir, exist_ok=True)
    tf.saved_model.save(module, model_dir, signatures={"encode": module.encode, "decode": module.decode})
    spec = dict(spec, format=FORMAT, format_version=FORMAT_VERSION, image_shape=list(image_shape),
                latent_dtype=latent_dtype(quantization["bits"]), quantization=quantization,
                metrics=metrics, fingerprint="sha256:pending")
    codec_path = os.path.join(model_dir, CODEC_FILE)
    with open(codec_path, "w") as f:
        json.dump(spec, f, indent=2)
    spec["fingerprint"] = compute_fingerprint(model_dir)
    validate_spec(spec, codec_path)
    with open(codec_path, "w") as f:
        json.dump(spec, f, indent=2)
    return spec
