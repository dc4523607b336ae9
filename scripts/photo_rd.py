"""Rate-distortion of the photo models on held-out photographs, beside JPEG, WebP and AVIF.

    python scripts/photo_rd.py --out rd-photos [--models photo:1 photo:2 ...] [--refine 50 ...] [--record]
    (what `make photo-rd` runs)
    python scripts/photo_rd.py --dataset cifar10 --out rd-cifar --models cifar-q1/ ... [--record]

The evaluation photos are the BSDS500 images of ../shared/data/bsds500 that training
holds out (crc32 of the key divisible by 10, `training.data.is_holdout`): the photo
models never saw them, and no public benchmark set (Kodak, CLIC, Tecnick) is used for
anything. With `--dataset cifar10`, the held-out images (same rule on the Parquet keys) of
the shared CIFAR-10 training set, for models fine-tuned on the rest; the record is then
bytes per image at WebP's qualities. They are written losslessly as PNG into the work folder and run through
`latentpack evaluate` (the real encode and decode jobs). With --record, the table, the
BD-rates and the plot go into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BSDS = os.path.join(ROOT, "..", "shared", "data", "bsds500")
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=["bsds500", "cifar10"], default="bsds500", help="held-out images of which set")
    p.add_argument("--out", default="rd-photos", help="work folder")
    p.add_argument("--models", nargs="+", help="models to evaluate (default: every shipped photo model)")
    p.add_argument("--limit", type=int, help="at most this many held-out photos")
    p.add_argument("--refine", type=int, nargs="+", metavar="STEPS",
                   help="also encode every model with these steps of refinement (encode --refine), one curve for them")
    p.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--record-only", action="store_true", help="only record an earlier run's rd.json from --out")
    args = p.parse_args(argv)
    if args.record_only:
        import json
        record(args, argv, json.load(open(os.path.join(args.out, "rd.json")))["images"])
        return 0
    sys.path.insert(0, ROOT)
    if not args.models:
        from pipeline import models
        args.models = sorted(models.shipped(), key=lambda name: int(name.split(":")[1]))
    source = BSDS if args.dataset == "bsds500" else CIFAR
    if not os.path.isdir(source):
        sys.exit(f"photo_rd: {source} is missing; this benchmark needs it")
    from latentpack import cli

    photos = os.path.join(args.out, "holdout")
    shutil.rmtree(photos, ignore_errors=True)
    os.makedirs(photos)
    names = write_holdout(args.dataset, photos, args.limit or (None if args.dataset == "bsds500" else 1000))
    print(f"photo_rd: {len(names)} held-out {args.dataset} images", flush=True)
    argv_eval = ["evaluate", "--input", os.path.join(photos, "*.png"), "--input-format", "images",
                 "--output", args.out, "--runner=FnApiRunner"]
    for model in args.models:
        argv_eval += ["--model-dir", model]
    if args.refine:
        argv_eval += ["--refine", "0", *map(str, args.refine)]
    if cli.main(argv_eval):
        return 1
    if args.record:
        record(args, argv, len(names))
    return 0


def write_holdout(dataset: str, folder: str, limit) -> list:
    """Write the held-out images of `dataset` into `folder` as PNG; returns their names."""
    from training.data import holdout_files, photos

    if dataset == "bsds500":
        names = [os.path.basename(p) for p in holdout_files(BSDS)][:limit]
        for name in names:
            Image.open(os.path.join(BSDS, name)).convert("RGB").save(os.path.join(folder, name[:-4] + ".png"))
        return names
    names = []
    for key, image in photos(os.path.join(CIFAR, "*.parquet"), "parquet", None, True, 10):
        names.append(key.replace(":", "_") + ".png")
        Image.fromarray(image).save(os.path.join(folder, names[-1]))
        if limit and len(names) >= limit:
            break
    return names


def at_bpp(points, family, bpp):
    """PSNR of a family's curve at `bpp`, interpolated (None outside its range)."""
    pts = sorted((p["bpp"], p["psnr"]) for p in points if p["family"] == family and p["psnr"] < 99)
    # A curve that ends within 1% of the rate counts as reaching it (its end point is used).
    if not pts or not pts[0][0] * 0.99 <= bpp <= pts[-1][0] * 1.01:
        return None
    return float(np.interp(bpp, [a for a, _ in pts], [b for _, b in pts]))


def stored_per_image(p) -> float:
    """A model's bytes per image counting every byte of its Parquet parts; a classical codec's file."""
    return p["stored_bytes"] / p["images"] if p["family"].startswith("latentpack") else p["bytes_per_image"]


def bytes_at(points, family, psnr):
    """Bytes per image (`stored_per_image`) of a family's curve at `psnr`, log-bytes interpolated
    between the points no other point beats in both bytes and PSNR; None outside the curve.
    family None: the fewest of the latentpack families' curves (the family a user would pick there)."""
    if family is None:
        found = [bytes_at(points, f, psnr) for f in {p["family"] for p in points if p["family"].startswith("latentpack")}]
        return min((b for b in found if b is not None), default=None)
    mine = [(p["psnr"], stored_per_image(p)) for p in points if p["family"] == family and p["psnr"] < 99]
    pts = sorted(a for a in mine if not any(b != a and b[0] >= a[0] and b[1] <= a[1] for b in mine))
    if not pts or not pts[0][0] - 0.05 <= psnr <= pts[-1][0] + 0.05:
        return None
    return float(np.exp(np.interp(psnr, [a for a, _ in pts], [np.log(b) for _, b in pts])))


def record(args, argv, n) -> None:
    import json

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from record import BENCHMARKS, replace_section

    report = json.load(open(os.path.join(args.out, "rd.json")))
    table = open(os.path.join(args.out, "rd.md")).read().strip()
    ours = sorted({p["family"] for p in report["points"] if p["family"].startswith("latentpack")})
    names = [f.replace("latentpack-", "latentpack ") for f in ours]
    command = " ".join(["python scripts/photo_rd.py"] + (argv if argv is not None else sys.argv[1:]))
    if args.dataset == "cifar10":
        if len(ours) > 1:
            ours, names = ours + [None], names + ["latentpack, best family"]
        rows = ["| WebP setting | PSNR dB | WebP bytes/image | " + " | ".join(f"{n} bytes/image (ratio)" for n in names)
                + " |", "|---|---:|---:|" + "---:|" * len(names)]
        for p in sorted((p for p in report["points"] if p["family"] == "webp"), key=lambda p: p["psnr"]):
            cells = []
            for family in ours:
                b = bytes_at(report["points"], family, p["psnr"])
                cells.append("—" if b is None else f"{b:.1f} ({b / p['bytes_per_image']:.2f}×)")
            rows.append(f"| {p['name']} | {p['psnr']:.2f} | {p['bytes_per_image']:.1f} | " + " | ".join(cells) + " |")
        replace_section("cifar-rd", f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}) on {n} held-out "
                                    f"CIFAR-10 training images (32x32), never used in training.\n\n"
                                    f"Bytes per image (latentpack: every byte of its Parquet parts; WebP: the file) at "
                                    f"the PSNR of each WebP "
                                    f"setting, interpolated along each curve (— outside it):\n\n" + "\n".join(rows)
                        + f"\n\nEvery point:\n\n{table}\n\n![CIFAR-10 rate-distortion](rd-cifar.png)", BENCHMARKS)
        shutil.copy(os.path.join(args.out, "rd.png"), os.path.join(os.path.dirname(BENCHMARKS), "rd-cifar.png"))
        return
    rows = ["| bits/pixel | " + " | ".join(names) + " | JPEG | WebP | AVIF |", "|---:|" + "---:|" * (len(names) + 3)]
    for bpp in (0.25, 0.5, 1.0):
        cells = [at_bpp(report["points"], f, bpp) for f in ours + ["jpeg", "webp", "avif"]]
        rows.append(f"| {bpp} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in cells) + " |")
    replace_section("photo-rd", f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}) on {n} held-out "
                                f"BSDS500 photographs ({', '.join(report['sizes'])}), never used in training.\n\n"
                                f"PSNR (dB) at fixed rates, interpolated along each curve (— outside it):\n\n"
                                + "\n".join(rows) + f"\n\nEvery point:\n\n{table}" + shipped_bd_rates(report["points"])
                                + "\n\n![photo rate-distortion](rd-photos.png)", BENCHMARKS)
    shutil.copy(os.path.join(args.out, "rd.png"), os.path.join(os.path.dirname(BENCHMARKS), "rd-photos.png"))

def shipped_bd_rates(points) -> str:
    """When other models share the curve with the shipped ones: the BD-rates of the shipped alone."""
    from pipeline.evaluate import bd_rate

    ours = [p for p in points if p["family"].startswith("latentpack")]
    shipped = [p for p in ours if str(p.get("model_dir", "")).startswith("photo:")]
    if len(shipped) < 2 or len(shipped) == len(ours):
        return ""
    rates = [(f, bd_rate([p for p in points if p["family"] == f], shipped)) for f in ("webp", "jpeg", "avif")]
    return ("\n\nBD-rate of the shipped models alone (" + ", ".join(sorted(p["model_dir"] for p in shipped)) + "): "
            + ", ".join(f"{f}: {r:+.1f}%" for f, r in rates if r is not None))


if __name__ == "__main__":
    sys.exit(main())
