"""The photo half of `make demo`: real photographs of mixed sizes through the shipped photo model.

    python scripts/photo_demo.py --out demo-out/photos --model photo:4

The photos are the ones scikit-image's wheel bundles in `skimage/data/` (read as files;
nothing is downloaded). They are encoded and decoded by the real Beam jobs with a model
that ships inside latentpack, and each is drawn beside JPEG and WebP at the same file
size (the largest quality whose file is no bigger than latentpack's code), with its PSNR.
Then the same photos are encoded again with `--refine 25` (each photo's latents searched at
encode time) and decoded by the same decoder, for the mean bits per pixel and PSNR of that.
Writes report.json and compare/<photo>.png.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from outdir import start_afresh

# Bundled in scikit-image's wheel (skimage/data), photographs of several sizes; camera is grey.
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png")


def photo_files() -> list:
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return [os.path.join(folder, name) for name in PHOTOS if os.path.exists(os.path.join(folder, name))]


def at_most(image: np.ndarray, codec: str, budget: int):
    """(bytes, decoded) of the highest quality whose file is no bigger than `budget` bytes."""
    mode = "L" if image.shape[-1] == 1 else "RGB"
    img = Image.fromarray(image[..., 0] if mode == "L" else image)

    def encode(q):
        out = io.BytesIO()
        img.save(out, format=codec, quality=q, **({"method": 6} if codec == "WEBP" else {}))
        return out.getvalue()

    lo, hi, best = 0 if codec == "WEBP" else 1, 100, None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = encode(mid)
        if len(data) <= budget:
            best, lo = data, mid + 1
        else:
            hi = mid - 1
    best = best if best is not None else encode(0 if codec == "WEBP" else 1)
    back = np.asarray(Image.open(io.BytesIO(best)).convert(mode)).reshape(image.shape)
    return len(best), back


def psnr(a, b) -> float:
    """PSNR of one image pair (the pipeline's batch PSNR)."""
    from pipeline.images import psnr as batch_psnr

    return float(batch_psnr(a[None], b[None])[0])


def side_by_side(panels, path: str, height: int = 300) -> None:
    """Panels of (title, image) in one row, each scaled to `height`, titles above."""
    tiles = []
    for title, image in panels:
        img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.LANCZOS)
        canvas = Image.new("RGB", (img.width, height + 22), "white")
        canvas.paste(img, (0, 22))
        ImageDraw.Draw(canvas).text((4, 4), title, fill="black")
        tiles.append(canvas)
    row = Image.new("RGB", (sum(t.width for t in tiles) + 6 * (len(tiles) - 1), height + 22), "white")
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + 6
    row.save(path)


REFINE = 25  # steps of the refined encode (README, "Refinement": 25 get nearly all of the gain)


def run(out: str, model: str, beam_args=()) -> dict:
    import pyarrow.parquet as pq

    from latentpack import cli
    from pipeline import latents, models
    from pipeline.completion import read_manifest

    files = photo_files()
    if not files:
        raise SystemExit("photo demo: scikit-image's bundled photos were not found (pip install scikit-image)")
    start_afresh(out, {"photos", "latents", "decoded", "latents-refined", "decoded-refined", "compare", "report.json"},
                 "photo demo")
    os.makedirs(f"{out}/photos")
    for path in files:
        shutil.copy(path, f"{out}/photos/")
    # A shipped model is found from the dataset's own record; a folder is given.
    decode_model = [] if models.is_shipped_name(model) else ["--model-dir", model]
    steps = []
    for suffix, refine in (("", []), ("-refined", ["--refine", str(REFINE)])):
        steps += [(f"encode photos{' --refine %d' % REFINE if refine else ''}",
                   ["encode", "--input", f"{out}/photos/*", "--input-format", "images", "--model-dir", model,
                    "--output", f"{out}/latents{suffix}"] + refine),
                  (f"decode photos{' (refined codes, the same decoder)' if refine else ''}",
                   ["decode", "--input", f"{out}/latents{suffix}", "--output", f"{out}/decoded{suffix}"] + decode_model)]
    for title, argv in steps:
        print(f"\n== {title}: latentpack {' '.join(argv)}", flush=True)
        started = time.time()
        if cli.main(argv + list(beam_args)):
            raise SystemExit(f"photo demo: step '{title}' failed")
        print(f"== {title} took {time.time() - started:.1f} s", flush=True)
    def code_bytes(folder):
        """(manifest, {key: code bytes}) of a latent dataset."""
        manifest = read_manifest(folder)
        table = pq.ParquetDataset(latents.part_paths(folder, manifest)).read()
        return manifest, dict(zip(table.column("key").to_pylist(), (len(c) for c in table.column("code").to_pylist())))

    manifest, codes = code_bytes(f"{out}/latents")
    refined_manifest, refined_codes = code_bytes(f"{out}/latents-refined")
    os.makedirs(f"{out}/compare")
    rows, pixels_all = [], 0
    from pipeline.images import decode_photo

    for path in files:
        key = os.path.splitext(os.path.basename(path))[0]
        original = decode_photo(open(path, "rb").read()).pixels
        decoded = np.asarray(Image.open(f"{out}/decoded/{key}.png")).reshape(original.shape)
        pixels = original.shape[0] * original.shape[1]
        pixels_all += pixels
        budget = codes[key]
        jpeg_bytes, jpeg = at_most(original, "JPEG", budget)
        webp_bytes, webp = at_most(original, "WEBP", budget)
        row = {"photo": key, "size": f"{original.shape[1]}x{original.shape[0]}", "channels": original.shape[2],
               "bpp": budget * 8 / pixels, "psnr": psnr(original, decoded),
               "jpeg_bpp": jpeg_bytes * 8 / pixels, "jpeg_psnr": psnr(original, jpeg),
               "webp_bpp": webp_bytes * 8 / pixels, "webp_psnr": psnr(original, webp)}
        refined = np.asarray(Image.open(f"{out}/decoded-refined/{key}.png")).reshape(original.shape)
        row.update(refined_bpp=refined_codes[key] * 8 / pixels, refined_psnr=psnr(original, refined))
        rows.append(row)
        side_by_side([(f"original {row['size']}", original),
                      (f"latentpack {row['bpp']:.3f} bpp {row['psnr']:.2f} dB", decoded),
                      (f"JPEG {row['jpeg_bpp']:.3f} bpp {row['jpeg_psnr']:.2f} dB", jpeg),
                      (f"WebP {row['webp_bpp']:.3f} bpp {row['webp_psnr']:.2f} dB", webp)],
                     f"{out}/compare/{key}.png")
    report = {"model": model, "photos": rows,
              "bpp_mean": float(np.mean([r["bpp"] for r in rows])),
              "psnr_mean": float(np.mean([r["psnr"] for r in rows])),
              "jpeg_psnr_mean": float(np.mean([r["jpeg_psnr"] for r in rows])),
              "webp_psnr_mean": float(np.mean([r["webp_psnr"] for r in rows])),
              "stored_bpp": manifest["total_bytes"] * 8 / pixels_all,
              "refined": {"refine": REFINE, "bpp_mean": float(np.mean([r["refined_bpp"] for r in rows])),
                          "psnr_mean": float(np.mean([r["refined_psnr"] for r in rows])),
                          "stored_bpp": refined_manifest["total_bytes"] * 8 / pixels_all},
              "dead_letters": manifest["dead_letters"]}
    with open(f"{out}/report.json", "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nlatentpack photo demo: {len(rows)} photographs of mixed sizes, model {model}")
    print(f"  {'photo':<16} {'size':>9} {'bpp':>6} {'PSNR':>6}   JPEG same bytes   WebP same bytes")
    for r in rows:
        print(f"  {r['photo']:<16} {r['size']:>9} {r['bpp']:6.3f} {r['psnr']:6.2f}   "
              f"{r['jpeg_psnr']:6.2f} dB          {r['webp_psnr']:6.2f} dB")
    print(f"  {'mean':<16} {'':>9} {report['bpp_mean']:6.3f} {report['psnr_mean']:6.2f}   "
          f"{report['jpeg_psnr_mean']:6.2f} dB          {report['webp_psnr_mean']:6.2f} dB")
    print(f"  every stored byte (keys, sizes, colour profiles, Parquet): {report['stored_bpp']:.3f} bpp")
    r = report["refined"]
    print(f"  encoded with --refine {REFINE} (same model and decoder; slower encoding): {r['bpp_mean']:.3f} bpp, "
          f"{r['psnr_mean']:.2f} dB mean ({r['stored_bpp']:.3f} bpp stored)")
    print(f"  written: {out}/report.json, {out}/compare/<photo>.png (original | latentpack | JPEG | WebP)")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo-out/photos", help="folder for everything this writes")
    p.add_argument("--model", default="photo:4", help="shipped model name or artifact folder")
    args, beam_args = p.parse_known_args(argv)
    run(args.out, args.model, beam_args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
