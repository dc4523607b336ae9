"""Rate-distortion of the photo models on held-out photographs, beside JPEG, WebP, AVIF and JPEG XL.

    python scripts/photo_rd.py --out rd-photos [--models photo:1 photo:2 ...] [--refine 50 ...] [--record]
    (what `make photo-rd` runs)
    python scripts/photo_rd.py --dataset cifar10 --out rd-cifar --models cifar-q1/ ... [--record]

The evaluation photos are held out of every model's training, one set per kind
(`--dataset photos`, the default, evaluates each): `bsds500`, the BSDS500 images of
../shared/data/bsds500 whose key's CRC32 is divisible by 10 (`training.data.is_holdout`);
`wikiphotos`, the wikiphotos of ../shared/data/wikiphotos held out by `scripts/photo_data.py`
(cities, buildings, interiors, night scenes). No public benchmark set (Kodak, CLIC, Tecnick) is
used for anything. With `--dataset cifar10`, the held-out images (same rule on the Parquet keys)
of the shared CIFAR-10 training set; the record is then bytes per image at WebP's qualities.
They are written losslessly as PNG into the work folder (`<out>/<kind>/`) and run through
`latentpack evaluate` (the real encode and decode jobs). With --record, each kind's table, its
BD-rates against every classical codec, its worst photo per level and its plot go into
BENCHMARKS.md.
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
WIKI = os.path.join(ROOT, "..", "shared", "data", "wikiphotos")
CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10")
KINDS = {"bsds500": BSDS, "wikiphotos": WIKI}
CLASSICAL = (("jpeg", "JPEG"), ("webp", "WebP"), ("avif", "AVIF"), ("jxl", "JPEG XL"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=["photos", "bsds500", "wikiphotos", "cifar10"], default="photos",
                   help="held-out images of which set (photos: each photo kind in turn)")
    p.add_argument("--out", default="rd-photos", help="work folder")
    p.add_argument("--models", nargs="+", help="models to evaluate (default: every shipped photo model)")
    p.add_argument("--limit", type=int, help="at most this many held-out photos")
    p.add_argument("--refine", type=int, nargs="+", metavar="STEPS",
                   help="also encode every model with these steps of refinement (encode --refine), one curve for them")
    p.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--record-only", action="store_true", help="only record an earlier run's rd.json from --out")
    args = p.parse_args(argv)
    kinds = list(KINDS) if args.dataset == "photos" else [args.dataset]
    if args.record_only:
        record(args, argv, kinds)
        return 0
    sys.path.insert(0, ROOT)
    if not args.models:
        from pipeline import models
        args.models = sorted(models.shipped(), key=lambda name: int(name.split(":")[1]))
    from latentpack import cli

    for kind in kinds:
        source = KINDS.get(kind, CIFAR)
        if not os.path.isdir(source):
            sys.exit(f"photo_rd: {source} is missing; this benchmark needs it")
        out = os.path.join(args.out, kind) if kind != "cifar10" else args.out
        photos = os.path.join(out, "holdout")
        shutil.rmtree(photos, ignore_errors=True)
        os.makedirs(photos)
        names = write_holdout(kind, photos, args.limit or (1000 if kind == "cifar10" else None))
        print(f"photo_rd: {len(names)} held-out {kind} images", flush=True)
        argv_eval = ["evaluate", "--input", os.path.join(photos, "*.png"), "--input-format", "images",
                     "--output", out, "--runner=FnApiRunner"]
        for model in args.models:
            argv_eval += ["--model-dir", model]
        if args.refine:
            argv_eval += ["--refine", "0", *map(str, args.refine)]
        if cli.main(argv_eval):
            return 1
    if args.record:
        record(args, argv, kinds)
    return 0


def write_holdout(dataset: str, folder: str, limit) -> list:
    """Write the held-out images of `dataset` into `folder` as PNG; returns their names."""
    from training.data import holdout_files, photos

    if dataset == "bsds500":
        names = [os.path.basename(p) for p in holdout_files(BSDS)][:limit]
        for name in names:
            Image.open(os.path.join(BSDS, name)).convert("RGB").save(os.path.join(folder, name[:-4] + ".png"))
        return names
    if dataset == "wikiphotos":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from photo_data import held_out

        names = [n for n in sorted(os.listdir(WIKI)) if n.endswith(".png") and held_out(dataset, "w" + n[:-4])][:limit]
        for name in names:
            Image.open(os.path.join(WIKI, name)).convert("RGB").save(os.path.join(folder, "w" + name))
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


def record(args, argv, kinds) -> None:
    import json

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from record import BENCHMARKS, replace_section

    command = " ".join(["python scripts/photo_rd.py"] + (argv if argv is not None else sys.argv[1:]))
    if kinds == ["cifar10"]:
        return record_cifar(args, command)
    sections = []
    for kind in kinds:
        out = os.path.join(args.out, kind)
        report = json.load(open(os.path.join(out, "rd.json")))
        points = report["points"]
        ours = sorted({p["family"] for p in points if p["family"].startswith("latentpack")})
        names = [f.replace("latentpack-", "latentpack ") for f in ours]
        rows = ["| bits/pixel | " + " | ".join(names) + " | " + " | ".join(n for _, n in CLASSICAL) + " |",
                "|---:|" + "---:|" * (len(names) + len(CLASSICAL))]
        for bpp in (0.25, 0.5, 1.0):
            cells = [at_bpp(points, f, bpp) for f in ours + [c for c, _ in CLASSICAL]]
            rows.append(f"| {bpp} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in cells) + " |")
        from pipeline.evaluate import bd_rates

        bd = [f"{f.replace('latentpack-', 'latentpack ')} against " + ", ".join(
            f"{dict(CLASSICAL)[c]} {v:+.1f}%" if v is not None else f"{dict(CLASSICAL)[c]} (no overlap)"
            for c, v in against.items()) for f, against in bd_rates(points).items()]
        worst = ["| " + p["name"] + f" | {p['bpp']:.3f} | {p['psnr']:.2f} | {p['psnr_min']:.2f} | "
                 + (min(zip(p["per_image"]["psnr"], report["keys"]))[1] if "keys" in report else "") + " |"
                 for p in points if p["family"].startswith("latentpack")]
        plot = "rd-photos.png" if kind == "bsds500" else f"rd-photos-{kind}.png"
        shutil.copy(os.path.join(out, "rd.png"), os.path.join(os.path.dirname(BENCHMARKS), plot))
        sections.append(
            f"### {kind}: {report['images']} held-out photos ({', '.join(report['sizes'])})\n\n"
            f"PSNR (dB) at fixed rates, interpolated along each curve (— outside it):\n\n" + "\n".join(rows)
            + "\n\nBD-rate (bits at equal PSNR over the range both curves cover; negative: fewer): "
            + "; ".join(bd) + shipped_bd_rates(points)
            + "\n\nEach model's worst photo:\n\n| model | bits/pixel | PSNR mean | PSNR worst | worst photo |\n"
            "|---|---:|---:|---:|---|\n" + "\n".join(worst)
            + f"\n\n<details><summary>Every point</summary>\n\n{open(os.path.join(out, 'rd.md')).read().strip()}"
            f"\n\n</details>\n\n![{kind} rate-distortion]({plot})")
    replace_section("photo-rd", f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}); the photos of each kind "
                                "are held out of every model's training.\n\n" + "\n\n".join(sections), BENCHMARKS)


def record_cifar(args, command) -> None:
    import json

    from record import BENCHMARKS, replace_section

    report = json.load(open(os.path.join(args.out, "rd.json")))
    n = report["images"]
    ours = sorted({p["family"] for p in report["points"] if p["family"].startswith("latentpack")})
    names = [f.replace("latentpack-", "latentpack ") for f in ours]
    table = open(os.path.join(args.out, "rd.md")).read().strip()
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


def shipped_bd_rates(points) -> str:
    """When other models share the curve with the shipped ones: the BD-rates of the shipped alone."""
    from pipeline.evaluate import bd_rate

    ours = [p for p in points if p["family"].startswith("latentpack")]
    shipped = [p for p in ours if str(p.get("model_dir", "")).startswith("photo:")]
    if len(shipped) < 2 or len(shipped) == len(ours):
        return ""
    rates = [(f, bd_rate([p for p in points if p["family"] == f], shipped)) for f in ("webp", "jpeg", "avif", "jxl")]
    return ("; the shipped models alone (" + ", ".join(sorted(p["model_dir"] for p in shipped)) + "): "
            + ", ".join(f"{f}: {r:+.1f}%" for f, r in rates if r is not None))


if __name__ == "__main__":
    sys.exit(main())
