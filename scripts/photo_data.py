"""Build the photo models' training mix and the held-out evaluation sets from ../shared/data.

    python scripts/photo_data.py --out photo-data

Writes (never committed; the sources' licences forbid it, and they are in ../shared anyway):
  photo-data/train/   the training mix, PNG (BSDS500 as its own JPEG files)
  photo-data/holdout/<kind>/   held-out photos of each kind, PNG, for `make photo-rd`

Kinds and the held-out rule (`training.data.is_holdout`, CRC32 of the key):
  bsds500     the 500 BSDS500 photos (481x321): the same 49 held out as always (crc % 10 == 0);
  wikiphotos  49 clean photos of cities, buildings, interiors and night scenes (~0.25 Mpx):
              held out where crc % 10 == 0 or crc % 4 == 0 (a bigger share: 13 photos);
Downscaled copies (by 2 and, for the larger wikiphotos, by 1.5; Lanczos, which leaves sharp,
artefact-free detail where a JPEG's 8x8 blocks were) are made only from photos that are trained on,
and named `d<k>-<key>` so that they sort after the originals and never stand for a held-out one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import zlib

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def crc(key: str) -> int:
    return zlib.crc32(key.encode())


def held_out(kind: str, key: str) -> bool:
    """Whether a photo of this kind is held out of training (its derivatives too)."""
    if kind == "wikiphotos":
        return crc(key) % 10 == 0 or crc(key) % 4 == 0
    return crc(key) % 10 == 0


def downscale(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    return image.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.LANCZOS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="photo-data", help="folder to write")
    args = p.parse_args(argv)
    train = os.path.join(args.out, "train")
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(train)
    counts = {}
    sources = {"bsds500": (os.path.join(SHARED, "bsds500"), ".jpg", "", (2,)),
               "wikiphotos": (os.path.join(SHARED, "wikiphotos"), ".png", "w", (1.5, 2))}
    for kind, (folder, ext, prefix, factors) in sources.items():
        if not os.path.isdir(folder):
            sys.exit(f"photo_data: {folder} is missing")
        holdout = os.path.join(args.out, "holdout", kind)
        os.makedirs(holdout)
        for name in sorted(os.listdir(folder)):
            if not name.endswith(ext):
                continue
            key = prefix + name[:-len(ext)]
            path = os.path.join(folder, name)
            image = Image.open(path).convert("RGB")
            if held_out(kind, key):
                image.save(os.path.join(holdout, key + ".png"))
                counts[kind + " held out"] = counts.get(kind + " held out", 0) + 1
                continue
            if ext == ".jpg":
                shutil.copyfile(path, os.path.join(train, key + ext))
            else:
                image.save(os.path.join(train, key + ".png"))
            for factor in factors:
                tag = str(factor).replace(".", "")
                downscale(image, factor).save(os.path.join(train, f"d{tag}-{key}.png"))
            counts[kind + " trained"] = counts.get(kind + " trained", 0) + 1
    total = sum(np.prod(Image.open(os.path.join(train, n)).size) for n in os.listdir(train))
    print(f"photo_data: {len(os.listdir(train))} training images ({total / 1e6:.1f} Mpx) in {train}; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
