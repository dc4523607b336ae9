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


def bits_at(curve, psnr: float):
    """Bits per pixel a rate-distortion curve needs for `psnr` (mean PSNR over the same images),
    log-rate interpolated between its two neighbouring points; None outside the curve's range
    (no extrapolation: a fit better than the best point of a ladder is reported as beyond it)."""
    pts = sorted((p["val_psnr"], p["val_bpp"]) for p in curve if p.get("val_bpp", 0) > 0)
    if len(pts) < 2 or not pts[0][0] <= psnr <= pts[-1][0]:
        return None
    q = np.array([a for a, _ in pts])
    r = np.maximum.accumulate(np.log([b for _, b in pts]))  # rate never falls as quality rises
    return float(np.exp(np.interp(psnr, q, r)))


def classical_curves(images, codecs=("webp", "avif")) -> dict:
    """{codec: [{"val_psnr", "val_bpp"} per quality]} over the same held-out images, with Pillow's
    codecs at the qualities `latentpack evaluate` sweeps."""
    from pipeline.evaluate import classical_points

    keys = [f"val{i}" for i in range(len(images))]
    curves = {}
    for p in classical_points(keys, list(images), codecs):
        curves.setdefault(p["family"], []).append({"val_psnr": p["psnr"], "val_bpp": p["bpp"], "quality": p["quality"]})
    return curves


def equal_quality(fit: dict, curves: dict) -> dict:
    """For each curve: how many more (+) or fewer (-) bits the fit spends than that codec needs
    for the fit's PSNR, as a fraction; None where the fit's PSNR is outside the curve."""
    out = {}
    for name, curve in curves.items():
        need = bits_at(curve, fit["val_psnr"])
        out[name] = None if need is None else fit["val_bpp"] / need - 1.0
    return out
