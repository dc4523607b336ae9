"""Loader benchmark: images per second from a latent dataset into a loop that touches every pixel
(`latentpack.open(...).iter_batches`, 1 and 2 decoding threads), beside the same images as PNG,
WebP and JPEG files read with Pillow and as Hugging Face Parquet read with `datasets`; peak RSS
of each reader (a child process each, ru_maxrss); and the time of `ds[key]` after the first call.

    python scripts/loader_bench.py --out bench-out/loader [--n 10000] [--record]

Sets: `cifar`: the first N CIFAR-10 training images (32x32) from ../shared/data/cifar10 with the
shipped photo:4; `photos`: the held-out BSDS500 photos (training's split) with photo:4. Each
reader runs in its own process (start-up and model loading excluded from the timed loop, which
is repeated; medians quoted).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
sys.path.insert(0, ROOT)


def build(kind: str, out: str, n: int) -> dict:
    """Source images as PNG files (the encode job's input), WebP/JPEG files, HF Parquet, and the latent dataset."""
    from PIL import Image

    folder = os.path.join(out, kind)
    png = os.path.join(folder, "png")
    if not os.path.isdir(png):
        os.makedirs(png)
        if kind == "cifar":
            import pyarrow.parquet as pq

            rows = 0
            for path in sorted(glob.glob(os.path.join(SHARED, "cifar10", "*.parquet"))):
                for record in pq.read_table(path).to_pylist():
                    image = record.get("img") or record.get("image")
                    with open(os.path.join(png, f"{rows:06d}.png"), "wb") as f:
                        f.write(image["bytes"])
                    rows += 1
                    if rows >= n:
                        break
                if rows >= n:
                    break
        else:
            from training.data import holdout_files

            for path in holdout_files(os.path.join(SHARED, "bsds500")):
                Image.open(path).convert("RGB").save(os.path.join(png, os.path.basename(path)[:-4] + ".png"))
    files = sorted(glob.glob(os.path.join(png, "*.png")))
    for fmt, ext, opts in (("webp", "webp", {"quality": 75, "method": 6}), ("jpeg", "jpg", {"quality": 75})):
        target = os.path.join(folder, fmt)
        if not os.path.isdir(target):
            os.makedirs(target)
            for path in files:
                Image.open(path).save(os.path.join(target, os.path.basename(path)[:-4] + "." + ext), **opts)
    hf = os.path.join(folder, "hf.parquet")
    if not os.path.exists(hf):
        import pyarrow as pa
        import pyarrow.parquet as pq

        images = [{"bytes": open(p, "rb").read(), "path": os.path.basename(p)} for p in files]
        pq.write_table(pa.table({"image": images}), hf)
    latents = os.path.join(folder, "latents")
    if not os.path.exists(os.path.join(latents, "_manifest.json")):
        from pipeline import encode

        encode.run(["--input", os.path.join(png, "*.png"), "--input-format", "images", "--model-dir", "photo:4",
                    "--output", latents, "--runner=FnApiRunner"])
    return {"folder": folder, "images": len(files), "pixels": sum(_size(p) for p in files)}


def _size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0] * im.size[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not carried over from the
    parent across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_reader(reader: str, folder: str, workers: int, repeats: int) -> dict:
    """In this process: time `repeats` passes of one reader; a touch of every pixel (a sum)."""
    from PIL import Image

    def touch(a):
        return int(np.asarray(a, np.uint8).sum(dtype=np.int64) & 1)

    if reader == "latentpack":
        import latentpack

        ds = latentpack.open(os.path.join(folder, "latents"), workers=workers)
        _ = ds.codec, ds.keys  # the model and key index loaded before timing

        def one_pass():
            n = 0
            for batch in ds.iter_batches(256):
                for image in batch["images"]:
                    touch(image)
                    n += 1
            return n
    elif reader == "hf":
        import datasets

        hf = datasets.load_dataset("parquet", data_files=os.path.join(folder, "hf.parquet"), split="train",
                                   cache_dir=os.path.join(folder, "hf-cache")).cast_column("image", datasets.Image())

        def one_pass():
            n = 0
            for record in hf:
                touch(record["image"])
                n += 1
            return n
    else:
        files = sorted(glob.glob(os.path.join(folder, reader, "*")))

        def one_pass():
            from concurrent.futures import ThreadPoolExecutor

            def load(path):
                with Image.open(path) as im:
                    return touch(im.convert("RGB"))

            if workers == 1:
                return sum(1 for p in files if load(p) is not None)
            with ThreadPoolExecutor(workers) as pool:
                return sum(1 for _ in pool.map(load, files))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = one_pass()
        times.append(time.perf_counter() - start)
    result = {"images": n, "seconds": statistics.median(times), "images_per_s": n / statistics.median(times),
              "peak_rss_mb": peak_rss_mb()}
    if reader == "latentpack":
        keys = ds.keys
        rng = np.random.default_rng(0)
        ds[keys[0]]
        lookups = []
        for k in rng.choice(len(keys), 20, replace=False):
            start = time.perf_counter()
            ds[keys[int(k)]]
            lookups.append(time.perf_counter() - start)
        result["lookup_ms"] = 1000 * statistics.median(lookups)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out/loader")
    p.add_argument("--n", type=int, default=10000, help="CIFAR-10 images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sets", nargs="+", default=["cifar", "photos"])
    p.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--child", nargs=4, metavar=("READER", "FOLDER", "WORKERS", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        reader, folder, workers, repeats = args.child
        print(json.dumps(run_reader(reader, folder, int(workers), int(repeats))))
        return 0
    results = {}
    for kind in args.sets:
        info = build(kind, args.out, args.n)
        rows = {}
        for reader in ("latentpack", "png", "webp", "jpeg", "hf"):
            for workers in ((1, 2) if reader != "hf" else (1,)):
                out = subprocess.run([sys.executable, __file__, "--child", reader, info["folder"], str(workers),
                                      str(args.repeats)], capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{reader} failed: {out.stderr[-2000:]}")
                rows[f"{reader} x{workers}"] = json.loads(out.stdout.strip().splitlines()[-1])
                print(kind, reader, workers, rows[f"{reader} x{workers}"], flush=True)
        results[kind] = {"info": info, "rows": rows}
    with open(os.path.join(args.out, "loader.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results, "python scripts/loader_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.record:
        from record import replace_section

        replace_section("loader-bench", text)
    return 0


def markdown(results: dict, command: str) -> str:
    lines = [f"`{command}` (2 cores; each reader in its own process, the model and key index loaded before "
             "the timed passes; medians of the passes; every pixel touched):", ""]
    for kind, r in results.items():
        info = r["info"]
        mpx = info["pixels"] / info["images"] / 1e6
        lines += [f"**{kind}** ({info['images']} images, {mpx:.3f} Mpx each):", "",
                  "| reader | threads | images/s | Mpx/s | peak RSS (MB) |", "|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            reader, workers = name.split(" x")
            label = {"latentpack": "latentpack.open (photo:4)", "png": "PNG files, Pillow",
                     "webp": "WebP files (q75), Pillow", "jpeg": "JPEG files (q75), Pillow",
                     "hf": "HF Parquet, `datasets`"}[reader]
            lines.append(f"| {label} | {workers} | {row['images_per_s']:.0f} | {row['images_per_s'] * mpx:.2f} | "
                         f"{row['peak_rss_mb']:.0f} |")
        lookup = r["rows"].get("latentpack x1", {}).get("lookup_ms")
        if lookup is not None:
            lines += ["", f"`ds[key]` after the first call: {lookup:.1f} ms median (20 random keys), decoding included."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
