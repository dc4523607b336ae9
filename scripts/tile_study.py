"""How the photo codec's tile sizes trade memory for time on a 24-megapixel photo (a study, not a
test): the float64 synthesis at several tile sizes, and `--refine` at several region sizes.

    python scripts/tile_study.py --out bench-out/tiles [--repeats 2]

Each setting runs in a fresh process (peak RSS from the kernel's accounting, ru_maxrss), the
settings taking turns `--repeats` times: `SpatialCodec.synthesis` of the photo's latents with
`spatial.SYNTHESIS_TILE`/`SYNTHESIS_PIXELS` set, and the encode job (in process, FnApiRunner)
with `--refine 1` and `refine.TILE_LATENTS`/`REGION_PIXELS` set. The photo is photo_bench's
(the first held-out BSDS500 photo upscaled). Results go to `--out`/tile_study.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHESIS_TILES = (1024, 768, 512)
REFINE_REGIONS = ((64, 1024), (48, 768))  # (tile latents, region side in pixels)


def child(argv) -> None:
    """One setting in this (fresh) process; prints {seconds, peak_gb, ...} as JSON."""
    import numpy as np

    from pipeline import models
    from pipeline.codec import load_codec

    kind, model, out = argv[0], argv[1], argv[2]
    if kind == "analysis":  # the photo's latents, for the synthesis runs
        from PIL import Image
        codec = load_codec(models.resolve(model))
        x = np.asarray(Image.open(os.path.join(out, "photo", "big.png")).convert("RGB"))[None]
        np.save(os.path.join(out, "latents.npy"), codec.analysis(x))
        return
    side = int(argv[3])
    started = time.perf_counter()
    if kind == "synthesis":
        from families.spatial import codec as spatial
        spatial.SYNTHESIS_TILE, spatial.SYNTHESIS_PIXELS = side, side * side
        pixels = load_codec(models.resolve(model)).synthesis(np.load(os.path.join(out, "latents.npy")))
        result = {"checksum": int(pixels[0, ::97, ::89].astype(np.int64).sum())}
    else:
        from pipeline import encode, refine
        refine.TILE_LATENTS, refine.REGION_PIXELS = int(argv[4]), side * side
        manifest = encode.run(["--input", os.path.join(out, "photo", "*.png"), "--input-format", "images",
                               "--model-dir", model, "--output", os.path.join(out, "refined"), "--refine", "1",
                               "--runner=FnApiRunner"])
        result = {"bytes": manifest["total_bytes"]}
    result.update(seconds=time.perf_counter() - started,
                  peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024)
    print(json.dumps(result))


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *map(str, args)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="photo:4")
    p.add_argument("--out", default="bench-out/tiles")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child)
        return 0
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from photo_bench import camera_photo

    out = os.path.abspath(a.out)
    camera_photo(os.path.join(out, "photo"))
    run_child("analysis", a.model, out)
    runs = {}
    for r in range(a.repeats):
        for side in SYNTHESIS_TILES:
            runs.setdefault(f"synthesis {side}", []).append(run_child("synthesis", a.model, out, side))
        for tile, side in REFINE_REGIONS:
            runs.setdefault(f"refine {side} ({tile} latents)", []).append(
                run_child("refine", a.model, out, side, tile))
        print(f"run {r + 1}/{a.repeats} done", flush=True)
    print("| setting | seconds | peak GB | check |\n|---|---:|---:|---:|")
    for name, results in runs.items():
        seconds = "–".join(f"{x:.1f}" for x in sorted({round(r['seconds'], 1) for r in results}))
        peaks = "–".join(f"{x:.2f}" for x in sorted({round(r['peak_gb'], 2) for r in results}))
        check = {r.get("checksum", r.get("bytes")) for r in results}
        print(f"| {name} | {seconds} | {peaks} | {', '.join(map(str, sorted(check)))} |")
    with open(os.path.join(out, "tile_study.json"), "w") as f:
        json.dump(runs, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
