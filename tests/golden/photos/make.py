"""Make the golden photo fixtures: real photographs in the forms users have them, and the exact
pixels the shipped photo:1 decodes them to through the encode and decode jobs.

    python tests/golden/photos/make.py            # sources/ (only if missing) and decoded/
    python tests/golden/photos/make.py --sources  # sources/ again (new files: regenerate decoded/ too)

sources/ holds crops of scikit-image's bundled photographs (public domain or CC0, see its
`skimage/data/README.txt`), saved as:
  rgb.png          a plain RGB photo (the cat, "chelsea")
  rotated.jpg      the coffee cup stored on its side with EXIF orientation 6 (viewers turn it upright)
  upside_down.jpg  the cat stored upside down with EXIF orientation 3
  grey.png         a grey photo (the camera man, mode L)
  sixteen.png      the same at 16 bits (mode I;16)
  palette.png      the coffee cup as a 256-colour palette (mode P)
  cmyk.jpg         the cat as a CMYK JPEG (mode CMYK, no profile: Pillow's plain conversion)
  profiled.png     the coffee cup with an embedded ICC profile (littleCMS's sRGB), kept on decode
decoded/<key>.png is what `latentpack decode` writes for each; `upright/<key>.png` is each photo as
a viewer shows it (the reference for PSNR). tests/test_golden.py encodes sources/ with photo:1,
decodes, and compares every pixel. Regenerate decoded/ only for an intended change of the model or
the codec, and say why in the commit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image, ImageCms

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
SIZE = (80, 112)  # height, width of every crop: small enough for the suite, large enough to mean something


def crop(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - SIZE[0]) // 2, (w - SIZE[1]) // 2
    return image[top:top + SIZE[0], left:left + SIZE[1]]


def sources(folder: str, upright: str) -> None:
    import skimage.data

    os.makedirs(folder, exist_ok=True)
    os.makedirs(upright, exist_ok=True)
    cat, coffee, camera = crop(skimage.data.chelsea()), crop(skimage.data.coffee()), crop(skimage.data.camera())
    shown = {}

    Image.fromarray(cat).save(os.path.join(folder, "rgb.png"))
    shown["rgb"] = cat
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise; shown turned back clockwise
    Image.fromarray(np.rot90(coffee, 1)).save(os.path.join(folder, "rotated.jpg"), exif=exif, quality=95)
    shown["rotated"] = np.asarray(Image.open(os.path.join(folder, "rotated.jpg")).transpose(Image.Transpose.ROTATE_270))
    exif[0x0112] = 3  # stored upside down
    Image.fromarray(cat[::-1, ::-1]).save(os.path.join(folder, "upside_down.jpg"), exif=exif, quality=95)
    shown["upside_down"] = np.asarray(Image.open(os.path.join(folder, "upside_down.jpg")).transpose(Image.Transpose.ROTATE_180))
    Image.fromarray(camera).save(os.path.join(folder, "grey.png"))
    shown["grey"] = camera
    Image.fromarray(camera.astype(np.uint16) * 257).save(os.path.join(folder, "sixteen.png"))
    shown["sixteen"] = camera
    palette = Image.fromarray(coffee).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    palette.save(os.path.join(folder, "palette.png"))
    shown["palette"] = np.asarray(palette.convert("RGB"))
    Image.fromarray(cat).convert("CMYK").save(os.path.join(folder, "cmyk.jpg"), quality=95)
    shown["cmyk"] = np.asarray(Image.open(os.path.join(folder, "cmyk.jpg")).convert("RGB"))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(coffee).save(os.path.join(folder, "profiled.png"), icc_profile=icc)
    shown["profiled"] = coffee
    for key, pixels in shown.items():
        Image.fromarray(pixels).save(os.path.join(upright, key + ".png"))


def decoded(folder: str, out: str) -> None:
    python = sys.executable
    with tempfile.TemporaryDirectory() as work:
        lat, dec = os.path.join(work, "lat"), os.path.join(work, "dec")
        for command in (["encode", "--input", os.path.join(folder, "*"), "--input-format", "images",
                         "--model-dir", "photo:1", "--output", lat],
                        ["decode", "--input", lat, "--output", dec]):
            subprocess.run([python, "-m", "latentpack.cli"] + command + ["--runner=FnApiRunner"], cwd=ROOT, check=True)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for name in sorted(os.listdir(dec)):
            if name.endswith(".png"):
                shutil.copyfile(os.path.join(dec, name), os.path.join(out, name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sources", action="store_true", help="write sources/ and upright/ again")
    args = p.parse_args(argv)
    folder, upright = os.path.join(HERE, "sources"), os.path.join(HERE, "upright")
    if args.sources or not os.path.isdir(folder):
        sources(folder, upright)
    decoded(folder, os.path.join(HERE, "decoded"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
