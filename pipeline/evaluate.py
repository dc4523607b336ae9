"""Rate-distortion evaluation: latentpack models against PNG, JPEG and WebP on the same images.

    latentpack evaluate --input val.npz --input-format npz \
        --model-dir models/q1 --model-dir models/q4 --output rd-out/

Each model runs through the real encode and decode jobs; its bytes are all the
bytes of the Parquet files the encode job writes, divided by images. Classical
codecs (Pillow) are counted as encoded file bytes, and beside that as the same bytes
in a zstd Parquet binary column with their keys, like for like. Writes rd.json,
rd.md and rd.png.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import decode, encode
from pipeline.artifact import read_spec
from pipeline.formats import READERS, load_images
from pipeline.errors import LatentpackError
from pipeline.images import psnr

JPEG_QUALITIES = (5, 10, 20, 30, 50, 70, 90)
WEBP_QUALITIES = (0, 5, 10, 20, 40, 60, 80, 95)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (TensorFlow's implementation, 11x11 Gaussian window or the image size)."""
    import tensorflow as tf

    size = min(11, a.shape[1], a.shape[2])
    size -= 1 - size % 2
    return tf.image.ssim(tf.constant(a), tf.constant(b), max_val=255, filter_size=size).numpy()


def container_bytes(keys, payloads) -> int:
    """Bytes of a zstd Parquet file holding `key` and the payloads as a binary column."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": pa.array(keys), "image": pa.array(payloads, pa.binary())}), buf,
                   compression="zstd")
    return len(buf.getvalue())


def classical_points(keys, images):
    """PNG (lossless), JPEG and WebP over their quality sweeps, with Pillow's codecs."""
    mode = "L" if images.shape[-1] == 1 else "RGB"
    plain = images[..., 0] if mode == "L" else images
    sweeps = [("png", None)] + [("jpeg", q) for q in JPEG_QUALITIES] + [("webp", q) for q in WEBP_QUALITIES]
    for codec, quality in sweeps:
        started = time.time()
        payloads, recon = [], np.empty_like(images)
        for i, image in enumerate(plain):
            out = io.BytesIO()
            img = Image.fromarray(image, mode)
            if codec == "png":
                img.save(out, format="PNG", optimize=True)
            elif codec == "jpeg":
                img.save(out, format="JPEG", quality=quality)
            else:
                img.save(out, format="WEBP", quality=quality, method=6)
            payloads.append(out.getvalue())
            back = np.asarray(Image.open(io.BytesIO(payloads[-1])).convert(mode))
            recon[i] = back.reshape(images.shape[1:])
        n = len(images)
        yield point(f"{codec}" + (f" q{quality}" if quality is not None else ""), codec,
                    sum(len(p) for p in payloads) / n, images, recon,
                    container_bytes_per_image=container_bytes(keys, payloads) / n, seconds=time.time() - started)


def point(name, family, bytes_per_image, images, recon, **extra):
    pixels = math.prod(images.shape[1:3])
    scores = psnr(images, recon)
    return dict({"name": name, "family": family, "bytes_per_image": bytes_per_image,
                 "bpp": bytes_per_image * 8 / pixels, "psnr": float(scores.mean()),
                 "psnr_min": float(scores.min()), "ssim": float(ssim(images, recon).mean())}, **extra)


def model_point(model_dir, args, beam_args, keys, images, index):
    spec = read_spec(model_dir)
    work = os.path.join(args.output, f"model-{index}")
    shutil.rmtree(work, ignore_errors=True)  # nothing from an earlier evaluation may be counted
    started = time.time()
    manifest = encode.run(["--input", args.input, "--input-format", args.input_format, "--model-dir", model_dir,
                           "--output", os.path.join(work, "latents"), "--max-bad-fraction", "1"] + beam_args)
    decode.run(["--input", os.path.join(work, "latents"), "--model-dir", model_dir,
                "--output", os.path.join(work, "decoded"), "--output-format", "npz"] + beam_args)
    by_key = {}
    for name in os.listdir(os.path.join(work, "decoded")):
        if name.endswith(".npz"):
            with np.load(os.path.join(work, "decoded", name)) as npz:
                by_key.update(zip(npz["keys"].tolist(), npz["images"]))
    recon = np.stack([by_key[k] for k in keys])
    training = spec.training
    label = (f"latentpack q{training['quality']}" if training.get("quality") else
             f"latentpack λ={training['lmbda']}" if training.get("lmbda") is not None else
             f"{spec.arch} autoencoder")
    family = "latentpack" if training.get("lmbda") is not None else f"{spec.arch}-ae"
    return point(label, family, manifest["total_bytes"] / manifest["images"], images, recon,
                 model_dir=model_dir, fingerprint=spec.fingerprint, latent_format=manifest["latent_format"],
                 seconds=time.time() - started)


def markdown(points) -> str:
    rows = ["| codec | bytes/image | in zstd Parquet | bits/pixel | PSNR dB (mean) | PSNR worst | SSIM |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lossless = p["psnr"] >= 99.9
        quality = "lossless | " if lossless else f"{p['psnr']:.2f} | {p['psnr_min']:.2f}"
        rows.append(f"| {p['name']} | {p['bytes_per_image']:.1f} | "
                    f"{p.get('container_bytes_per_image', p['bytes_per_image']):.1f} | {p['bpp']:.3f} | "
                    f"{quality} | {p['ssim']:.4f} |")
    return "\n".join(rows)


def plot(points, path: str) -> None:
    """Rate-distortion curves: bytes per image (log) against PSNR, one line per codec family.
    Classical codecs also get a dashed line for their bytes inside a zstd Parquet column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"latentpack": ("o-", "C3"), "jpeg": ("s-", "C0"), "webp": ("^-", "C2"), "mlp-ae": ("D", "C4"),
              "conv-ae": ("v", "C1")}
    for family in dict.fromkeys(p["family"] for p in points):
        pts = sorted((p for p in points if p["family"] == family and p["psnr"] < 99.9),
                     key=lambda p: p["bytes_per_image"])
        if not pts:
            continue
        marker, color = styles.get(family, ("x-", "k"))
        ax.plot([p["bytes_per_image"] for p in pts], [p["psnr"] for p in pts], marker, color=color, label=family)
        if "container_bytes_per_image" in pts[0]:
            ax.plot([p["container_bytes_per_image"] for p in pts], [p["psnr"] for p in pts], marker[0] + "--",
                    color=color, alpha=0.45, label=f"{family} in zstd Parquet")
    for p in points:
        if p["family"] == "png":
            ax.axvline(p["bytes_per_image"], color="gray", ls=":", label="png (lossless)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000, 2000)
                   if min(p["bytes_per_image"] for p in points) / 2 <= t <= 2 * max(p["bytes_per_image"] for p in points)])
    ax.set_xlabel("bytes per image (all stored bytes / images)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="latentpack evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam for the encode and decode jobs.")
    p.add_argument("--input", required=True, help="glob of the evaluation images")
    p.add_argument("--input-format", default="tfrecord", choices=sorted(READERS), help="format of --input")
    p.add_argument("--model-dir", action="append", default=[], help="a model artifact; repeat for several")
    p.add_argument("--output", required=True, help="folder for rd.json, rd.md, rd.png and the jobs' outputs")
    p.add_argument("--no-classical", action="store_true", help="skip PNG, JPEG and WebP")
    return p.parse_known_args(argv)


def run(argv=None) -> list:
    args, beam_args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    keys, images, _, _ = load_images(args.input, args.input_format)
    if len(set(keys)) != len(keys):
        raise LatentpackError("evaluation images need unique keys")
    logging.info("evaluating on %d images %s", len(images), images.shape[1:])
    points = []
    for i, model_dir in enumerate(args.model_dir):
        points.append(model_point(model_dir, args, beam_args, keys, images, i))
        print(f"  {points[-1]['name']}: {points[-1]['bytes_per_image']:.1f} bytes/image, "
              f"{points[-1]['psnr']:.2f} dB", flush=True)
    if not args.no_classical:
        for p in classical_points(keys, images):
            points.append(p)
            print(f"  {p['name']}: {p['bytes_per_image']:.1f} bytes/image, {p['psnr']:.2f} dB", flush=True)
    with open(os.path.join(args.output, "rd.json"), "w") as f:
        json.dump({"images": len(images), "image_shape": list(images.shape[1:]), "points": points}, f, indent=2)
    with open(os.path.join(args.output, "rd.md"), "w") as f:
        f.write(markdown(points) + "\n")
    plot(points, os.path.join(args.output, "rd.png"))
    return points


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    points = run(argv)
    print(markdown(points))
    return 0


if __name__ == "__main__":
    from pipeline.cli import guarded
    sys.exit(guarded(main)())
