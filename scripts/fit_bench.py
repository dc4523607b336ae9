"""The fit benchmark: how much a short fit to one's own data gains over the shipped model it starts from.

    python scripts/fit_bench.py --out fit-bench --minutes 10 30 60        # `make fit-bench`

For each domain built here from ../shared/data (never committed) and each CPU-minute budget, runs
the command a user would run,

    latentpack train --arch hyperprior --init-from photo:4 --input DOMAIN --minutes M --export-anyway ...

and reads the held-out verdict it writes (`<checkpoint-dir>/verdict.json`: start and fit measured
on the same held-out images with real codes, and the bits the fit spends at its own PSNR against
the shipped photo models' curve, WebP and AVIF). Domains:
  cifar10      CIFAR-10's 32x32 photos (Parquet, Hugging Face layout), whole images; held out: CRC32 split
  mnist        MNIST's 28x28 grey digits (idx) through the photo family; held out: CRC32 split
  grey-photos  the photo training mix turned grey; held out: the grey copies of photo-data/holdout
               (`scripts/photo_data.py`), which no shipped model trained on
Writes fit-bench.md (the table), fit-bench.json and fit-bench.png into --out.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def grey_photos(photo_data: str, out: str) -> tuple:
    """Grey PNG copies of a photo_data.py folder: (training glob, held-out glob)."""
    from PIL import Image

    for part in ("train", "holdout"):
        sources = sorted(glob.glob(os.path.join(photo_data, part, "*.*")) +
                         glob.glob(os.path.join(photo_data, part, "*", "*.png")))
        if not sources:
            sys.exit(f"fit_bench: no photos in {photo_data}/{part}; run scripts/photo_data.py --out {photo_data}")
        folder = os.path.join(out, part)
        os.makedirs(folder, exist_ok=True)
        for path in sources:
            name = os.path.splitext(os.path.basename(path))[0] + ".png"
            if not os.path.exists(os.path.join(folder, name)):
                Image.open(path).convert("L").save(os.path.join(folder, name))
    return os.path.join(out, "train", "*.png"), os.path.join(out, "holdout", "*.png")


def domains(args) -> dict:
    """{name: train arguments}: the data, and settings for its image size."""
    tiny = ["--crop", "32", "--batch-size", "32", "--val-images", str(args.tiny_val_images)]
    train, holdout = grey_photos(args.photo_data, os.path.join(args.out, "data", "grey-photos"))
    return {
        "cifar10": ["--input", os.path.join(SHARED, "cifar10", "train-*.parquet"), "--input-format", "parquet"] + tiny,
        "mnist": ["--input", os.path.join(SHARED, "mnist", "train-images-idx3-ubyte.gz"), "--input-format", "idx"] + tiny,
        "grey-photos": ["--input", train, "--input-format", "images", "--validation", holdout,
                        "--val-images", "100", "--crop", "128", "--batch-size", "8"],
    }


def run_fit(name: str, minutes: float, data: list, args) -> dict:
    model_dir = os.path.join(args.out, f"{name}-{minutes:g}min")
    checkpoints = model_dir + "-checkpoints"
    verdict_path = os.path.join(checkpoints, "verdict.json")
    if os.path.exists(verdict_path) and not args.again:
        print(f"fit_bench: {name}, {minutes:g} min: kept from an earlier run ({verdict_path})", flush=True)
    else:
        subprocess.run(["rm", "-rf", model_dir, checkpoints], check=True)
        command = [sys.executable, "-m", "latentpack.cli", "train", "--arch", "hyperprior", "--init-from", args.start,
                   "--minutes", f"{minutes:g}", "--learning-rate", str(args.learning_rate), "--export-anyway",
                   "--validate-every", "1000", "--model-dir", model_dir, "--checkpoint-dir", checkpoints] + data
        print(f"fit_bench: {name}, {minutes:g} min: " + " ".join(command[2:]), flush=True)
        started = time.time()
        with open(model_dir + ".log", "w") as log:
            status = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if status != 0 or not os.path.exists(verdict_path):
            sys.exit(f"fit_bench: the fit failed (exit {status}); see {model_dir}.log")
        print(f"fit_bench: {name}, {minutes:g} min: done in {(time.time() - started) / 60:.1f} min", flush=True)
    verdict = json.load(open(verdict_path))
    history = json.load(open(os.path.join(checkpoints, "history.json")))
    return {"domain": name, "minutes": minutes, "steps": history["train"][-1]["step"] if history["train"] else 0,
            "start": verdict["start"], "fit": verdict["fit"], "bits_change": verdict["bits_change"],
            "psnr_change": verdict["psnr_change"], "better": verdict["better"],
            "equal_psnr": verdict["equal_psnr"], "start_model": verdict["start_model"]}


def pct(v) -> str:
    return "outside" if v is None else f"{100 * v:+.1f}%"


def table(rows: list) -> str:
    lines = ["| domain | CPU min | steps | held-out images | start PSNR / bpp | fit PSNR / bpp | bits at equal PSNR vs "
             "shipped photo models | vs WebP | vs AVIF | better by the loss |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        s, f, e = r["start"], r["fit"], r["equal_psnr"]
        lines.append(f"| {r['domain']} | {r['minutes']:g} | {r['steps']} | {f['val_images']} | "
                     f"{s['val_psnr']:.2f} dB / {s['val_bpp']:.3f} | {f['val_psnr']:.2f} dB / {f['val_bpp']:.3f} | "
                     f"{pct(e.get('shipped'))} | {pct(e.get('webp'))} | {pct(e.get('avif'))} | "
                     f"{'yes' if r['better'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["domain"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = sorted((r for r in rows if r["domain"] == name), key=lambda r: r["minutes"])
        for key, label in (("shipped", "vs shipped photo models"), ("webp", "vs WebP"), ("avif", "vs AVIF")):
            pts = [(r["minutes"], 100 * r["equal_psnr"][key]) for r in mine if r["equal_psnr"].get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("CPU minutes of fitting")
        ax.set_ylabel("bits at equal PSNR (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="fit-bench")
    p.add_argument("--minutes", type=float, nargs="+", default=[10, 30, 60])
    p.add_argument("--domains", nargs="+", default=["cifar10", "mnist", "grey-photos"])
    p.add_argument("--start", default="photo:4", help="the shipped model every fit starts from")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--photo-data", default="photo-data", help="scripts/photo_data.py's folder")
    p.add_argument("--tiny-val-images", type=int, default=500, help="held-out images of the 32x32 domains")
    p.add_argument("--again", action="store_true", help="run fits again whose verdict is already there")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = domains(args)
    unknown = set(args.domains) - set(data)
    if unknown:
        sys.exit(f"fit_bench: unknown domain(s) {sorted(unknown)}; known: {sorted(data)}")
    # Rows of earlier invocations into the same --out stay in the table; this one's replace theirs.
    earlier = os.path.join(args.out, "fit-bench.json")
    rows = json.load(open(earlier)) if os.path.exists(earlier) else []
    for name in args.domains:
        for minutes in args.minutes:
            row = run_fit(name, minutes, data[name], args)
            rows = sorted([r for r in rows if (r["domain"], r["minutes"]) != (name, minutes)] + [row],
                          key=lambda r: (r["domain"], r["minutes"]))
            with open(os.path.join(args.out, "fit-bench.json"), "w") as fh:
                json.dump(rows, fh, indent=1)
            with open(os.path.join(args.out, "fit-bench.md"), "w") as fh:
                fh.write(table(rows))
            plot(rows, os.path.join(args.out, "fit-bench.png"))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
