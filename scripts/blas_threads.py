"""Decode speed of photo models with the integer networks on one BLAS thread (what the codecs do,
`pipeline.integer.one_blas_thread`) against BLAS's default threads, side by side in one process.

    python scripts/blas_threads.py --photos 'photo-data/holdout/bsds500/*.png' --models photo:4 [more]

Each model's codes of the photos are made once; then the two settings take turns, `--repeats`
times, each decoding every code through `codec.decompress`; prints medians in Mpx/s.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import statistics
import time

import numpy as np
from PIL import Image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", required=True, help="glob of photos (PNG/JPEG)")
    p.add_argument("--models", nargs="+", default=["photo:4"], help="shipped names or artifact folders")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import families.hyperprior.codec as hyperprior
    import pipeline.integer as integer
    from pipeline import latents, models
    from pipeline.codec import load_codec, schema_of
    from pipeline.images import ImageBatch

    images = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(glob.glob(args.photos))[:args.limit]]
    mpx = sum(i.shape[0] * i.shape[1] for i in images) / 1e6
    none = np.array([-1]), np.array([False])
    coded = {}
    for name in args.models:
        codec = load_codec(models.resolve(name))
        coded[name] = codec, [latents.to_table(["x"], codec.compress(ImageBatch(["x"], im[None], *none), "code"),
                                               *none, schema_of(codec.spec, "code")) for im in images]
    settings = {"one BLAS thread": integer.one_blas_thread, "BLAS default": contextlib.nullcontext}
    times = {}
    for _ in range(args.repeats):
        for setting, context in settings.items():
            integer.one_blas_thread = hyperprior.one_blas_thread = context
            for name, (codec, tables) in coded.items():
                start = time.perf_counter()
                for table in tables:
                    list(codec.decompress(table))
                times.setdefault((name, setting), []).append(time.perf_counter() - start)
    print(f"{len(images)} photos, {mpx:.2f} Mpx, medians of {args.repeats}:")
    for (name, setting), seconds in times.items():
        print(f"  {name:<24} {setting:<16} {mpx / statistics.median(seconds):.2f} Mpx/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
