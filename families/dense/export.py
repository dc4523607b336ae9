"""Freeze a trained dense encoder/decoder into the model artifact the pipeline loads.

Quantization ranges are fitted once here on training latents and baked into the
SavedModel's `encode`/`decode` signatures, so the signature is the file format.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import tensorflow as tf

from pipeline.artifact import CODEC_FILE
from pipeline.images import psnr
from training.export import staged, write_codec_json


def fit_quantization(latents: np.ndarray, bits: int, tail: float = 0.05) -> dict:
    """Per-dimension uniform quantizer with 2**bits levels covering the central (100 - 2*tail)% of
    training latents, as signed integers: q = clip(round((z - low) / step), min, max)."""
    lo = np.percentile(latents, tail, axis=0)
    hi = np.percentile(latents, 100 - tail, axis=0)
    half = 2 ** (bits - 1)
    step = np.maximum((hi - lo) / (2 * half - 1), 1e-6)
    d = latents.shape[1]
    return {"kind": "uniform", "bits": bits, "low": (lo + half * step).tolist(), "step": step.tolist(),
            "min": [-half] * d, "max": [half - 1] * d}


def integer_quantization(entropy_model: dict) -> dict:
    """Plain rounding, clipped to the entropy model's tables: q = clip(round(z), offset, offset + size - 1)."""
    low = np.asarray(entropy_model["offsets"])
    high = low + np.array([len(t) for t in entropy_model["frequencies"]]) - 1
    bits = 8 if low.min() >= -128 and high.max() <= 127 else 16
    return {"kind": "integer", "bits": bits, "low": [0.0] * len(low), "step": [1.0] * len(low),
            "min": low.tolist(), "max": high.tolist()}


def latent_dtype(quantization: dict) -> str:
    return "int8" if min(quantization["min"]) >= -128 and max(quantization["max"]) <= 127 else "int16"


class CodecModule(tf.Module):
    """encode: uint8 images -> integer latents; decode: the reverse. The quantizer is baked in.

    Two more signatures serve encoder-side refinement (`pipeline/refine.py`, `encode --refine`):
    `analyze`, the encoder's latents before rounding, in quantizer steps; `synthesize`, the
    decoder's float image from such latents, differentiable. Readers without refinement ignore them."""

    def __init__(self, encoder, decoder, image_shape, quantization):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self._dtype = tf.int8 if latent_dtype(quantization) == "int8" else tf.int16
        self._low = tf.constant(quantization["low"], tf.float32)
        self._step = tf.constant(quantization["step"], tf.float32)
        self._min = tf.constant(quantization["min"], tf.float32)
        self._max = tf.constant(quantization["max"], tf.float32)
        d = len(quantization["low"])
        self.encode = tf.function(self._encode, input_signature=[
            tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([None, d], self._dtype, name="latent")])
        self.analyze = tf.function(self._analyze, input_signature=[
            tf.TensorSpec([None, *image_shape], tf.uint8, name="images")])
        self.synthesize = tf.function(self._synthesize, input_signature=[
            tf.TensorSpec([None, d], tf.float32, name="latent")])

    def _analyze(self, images):
        z = self.encoder(tf.cast(images, tf.float32) / 255.0, training=False)
        return {"latent": (z - self._low) / self._step}

    def _encode(self, images):
        q = tf.clip_by_value(tf.round(self._analyze(images)["latent"]), self._min, self._max)
        return {"latent": tf.cast(q, self._dtype)}

    def _synthesize(self, latent):
        return {"image": tf.clip_by_value(self.decoder(latent * self._step + self._low, training=False), 0.0, 1.0)}

    def _decode(self, latent):
        x = self._synthesize(tf.cast(latent, tf.float32))["image"]
        return {"image": tf.cast(tf.round(x * 255.0), tf.uint8)}

    def save(self, model_dir: str) -> None:
        """The SavedModel with all four signatures."""
        tf.saved_model.save(self, model_dir, signatures={"encode": self.encode, "decode": self.decode,
                                                         "analyze": self.analyze, "synthesize": self.synthesize})


def export(model_dir: str, encoder, decoder, image_shape, quantization: dict, spec: dict,
           val_images: np.ndarray) -> dict:
    """Write the SavedModel and codec.json; returns the final spec (with fingerprint, val PSNR)."""
    module = CodecModule(encoder, decoder, tuple(image_shape), quantization)
    metrics = {}
    if len(val_images):
        latent = np.concatenate([module.encode(val_images[i:i + 1024])["latent"].numpy()
                                 for i in range(0, len(val_images), 1024)])
        recon = np.concatenate([module.decode(latent[i:i + 1024])["image"].numpy()
                                for i in range(0, len(latent), 1024)])
        scores = psnr(val_images, recon)
        metrics = {"val_psnr": float(scores.mean()), "val_psnr_min": float(scores.min()),
                   "val_images": int(len(val_images))}
        if "entropy_model" in spec:
            from pipeline.entropy import EntropyCoder
            codes = EntropyCoder(spec["entropy_model"]).encode(latent)
            metrics["val_code_bytes"] = float(np.mean([len(c) for c in codes]))
    os.makedirs(model_dir, exist_ok=True)
    module.save(model_dir)
    spec = dict(spec, family="dense", image_shape=list(image_shape), latent_dtype=latent_dtype(quantization),
                quantization=quantization, metrics=metrics)
    return write_codec_json(model_dir, spec)


def add_refinement_to(model_dir: str) -> dict:
    """Re-export a dense artifact made before refinement existed with the same weights, quantizer and
    tables plus the `analyze`/`synthesize` signatures: codes it wrote stay valid, since `encode`
    and `decode` compute exactly what they did. Its fingerprint changes (the SavedModel does)."""
    from families.dense import model

    base = model_dir.rstrip("/")
    from training.export import recover

    recover(base, ".before-refinement")  # an earlier call that stopped between its renames
    with open(os.path.join(base, CODEC_FILE)) as f:
        raw = json.load(f)
    shape = tuple(raw["image_shape"])
    arch = raw["architecture"]
    encoder, decoder = model.build(arch["arch"], shape, arch["latent_dim"], arch.get("width", 16))
    # The SavedModel's variables are a checkpoint of the CodecModule: encoder/..., decoder/...
    status = tf.train.Checkpoint(encoder=encoder, decoder=decoder).read(os.path.join(base, "variables", "variables"))
    status.assert_existing_objects_matched().expect_partial()
    # Written whole beside the artifact, then swapped in: an interruption leaves the old one intact.
    with staged(base, ".refinable", ".before-refinement") as tmp:
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("saved_model.pb", "fingerprint.pb", "variables"),
                        dirs_exist_ok=True)
        CodecModule(encoder, decoder, shape, raw["quantization"]).save(tmp)
        spec = {k: v for k, v in raw.items() if k not in ("format", "format_version", "fingerprint")}
        spec = write_codec_json(tmp, dict(spec, family="dense"))  # format 1 had no family field
    return spec
