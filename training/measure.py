"""Held-out figures of a written artifact, measured through the pipeline's own codec."""
from __future__ import annotations

import numpy as np


def measure_codec(model_dir: str, images) -> dict:
    """Held-out PSNR and bits per pixel of a written artifact, through the pipeline's own codec
    (`load_codec`: real codes, decoded as the decode job decodes them); also the worst photo."""
    from pipeline import latents
    from pipeline.codec import schema_of
    from pipeline.codec import load_codec
    from pipeline.errors import LatentpackError
    from pipeline.images import ImageBatch, psnr

    if not images:
        return {}
    codec = load_codec(model_dir)
    schema = schema_of(codec.spec, "code")
    psnrs, bpps, mses = [], [], []
    for i, image in enumerate(images):
        batch = ImageBatch([f"val{i}"], image[None], np.full(1, -1, np.int64), np.zeros(1, bool))
        columns = codec.compress(batch, "code")
        table = latents.to_table(batch.keys, columns, batch.labels, batch.has_label, schema)
        decoded = list(codec.decompress(table))
        if len(decoded) != 1 or not isinstance(decoded[0], ImageBatch):
            raise LatentpackError(f"{model_dir}: a held-out photo does not decode ({decoded[0]})")
        psnrs.append(float(psnr(image[None], decoded[0].images[:1])[0]))
        mses.append(float(np.mean((image.astype(np.float64) - decoded[0].images[0].astype(np.float64)) ** 2)))
        bpps.append(8.0 * len(columns["code"][0].as_py()) / (image.shape[0] * image.shape[1]))
    return {"val_psnr": float(np.mean(psnrs)), "val_bpp": float(np.mean(bpps)), "val_psnr_min": min(psnrs),
            "val_mse": float(np.mean(mses)), "val_images": len(images)}


def verdict(start: dict, fit: dict, lmbda: float) -> dict:
    """Whether a fit beats the model it started from on the same held-out images: the training
    objective itself (bits per pixel + lambda * MSE on the 0..255 scale, CompressAI's convention),
    measured on real codes; with both figures and the bits saved."""
    def loss(m):
        return m["val_bpp"] + lmbda * m["val_mse"]

    return {"start": start, "fit": fit, "start_loss": loss(start), "fit_loss": loss(fit),
            "better": loss(fit) < loss(start), "bits_change": fit["val_bpp"] / start["val_bpp"] - 1.0,
            "psnr_change": fit["val_psnr"] - start["val_psnr"]}
