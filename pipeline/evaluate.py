"""Rate-distortion evaluation: latentpack models against PNG, JPEG, WebP, AVIF and JPEG XL on the same images.

    latentpack evaluate --input 'photos/*.png' --input-format images \
        --model-dir photo:2 --model-dir photo:4 --output rd-out/

Images may be of any size. Each model runs through the real encode and decode jobs.
Rates are bits per pixel per image, averaged over images (the field's convention): for
a model, its code bytes; beside that, every byte of the Parquet files the encode job
wrote (keys, sizes and footers included) over all pixels. Classical codecs (Pillow) are
counted as encoded file bytes, and beside that as the same bytes in a zstd Parquet binary
column with their keys. Distortion: RGB PSNR per image, and MS-SSIM (TensorFlow's) when
every image is at least 161 pixels a side, SSIM otherwise. BD-rate (Bjøntegaard, piecewise
linear in log-rate over the overlapping PSNR range) of each model family against WebP and
JPEG. Writes rd.json, rd.md and rd.png.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from typing import List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import families
from pipeline import decode, encode, latents
from pipeline.artifact import read_spec
from pipeline.codec import codec_class
from pipeline.errors import LatentpackError
from pipeline.formats import READERS, get_reader
from pipeline.images import ImageBatch, batch_photos, psnr
from pipeline.errors import log, show_progress

JPEG_QUALITIES = (5, 10, 20, 30, 50, 70, 90)
WEBP_QUALITIES = (0, 5, 10, 20, 40, 60, 80, 95)
AVIF_QUALITIES = (10, 20, 30, 40, 50, 60, 75, 90)
JXL_QUALITIES = (10, 25, 40, 55, 70, 80, 90, 95)  # libjxl's quality ("level"), effort 7
MS_SSIM_MIN_SIDE = 161  # five scales of an 11-pixel window


def load_eval_images(pattern: str, input_format: str, limit: Optional[int] = None):
    """(keys, images): every readable image of the input, any size, in key order."""
    reader = get_reader(input_format)
    shards, root = reader.match(pattern)
    found = {}
    for shard in shards:
        for item in batch_photos(reader.records(shard, root), batch_size=64):
            if isinstance(item, ImageBatch):
                found.update(zip(item.keys, item.images))
    if not found:
        raise LatentpackError(f"no readable images in --input {pattern!r} ({input_format})")
    keys = sorted(found)[:limit] if limit else sorted(found)
    return keys, [found[k] for k in keys]


def structural_similarity(a: List[np.ndarray], b: List[np.ndarray]) -> tuple:
    """("ms_ssim" or "ssim", per-image values): MS-SSIM when every image is large enough."""
    import tensorflow as tf

    multi = min(min(x.shape[:2]) for x in a) >= MS_SSIM_MIN_SIDE
    values = []
    for x, y in zip(a, b):
        x, y = tf.constant(x[None]), tf.constant(y[None])
        if multi:
            values.append(float(tf.image.ssim_multiscale(x, y, max_val=255)[0]))
        else:
            size = min(11, *x.shape[1:3])
            size -= 1 - size % 2
            values.append(float(tf.image.ssim(x, y, max_val=255, filter_size=size)[0]))
    return ("ms_ssim" if multi else "ssim"), np.array(values)


def container_bytes(keys, payloads) -> int:
    """Bytes of a zstd Parquet file holding `key` and the payloads as a binary column."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": pa.array(keys), "image": pa.array(payloads, pa.binary())}), buf,
                   compression="zstd")
    return len(buf.getvalue())


def classical_encode(image: np.ndarray, codec: str, quality: Optional[int]) -> bytes:
    """One image through its codec: Pillow's PNG (lossless), JPEG, WebP (method 6) or AVIF (speed 6);
    JPEG XL through imagecodecs' libjxl (effort 7)."""
    if codec == "jxl":
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(image[..., 0] if image.shape[-1] == 1 else image, level=quality,
                                               effort=7))
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = io.BytesIO()
    if codec == "png":
        img.save(out, format="PNG", optimize=True)
    elif codec == "jpeg":
        img.save(out, format="JPEG", quality=quality)
    elif codec == "webp":
        img.save(out, format="WEBP", quality=quality, method=6)
    else:
        img.save(out, format="AVIF", quality=quality, speed=6)
    return out.getvalue()


def classical_decode(data: bytes, like: np.ndarray) -> np.ndarray:
    if data[:2] == b"\xff\x0a" or data[4:8] == b"JXL ":  # a JPEG XL codestream or container
        import imagecodecs

        return np.asarray(imagecodecs.jpegxl_decode(data), np.uint8).reshape(like.shape)
    img = Image.open(io.BytesIO(data)).convert("L" if like.shape[-1] == 1 else "RGB")
    return np.asarray(img).reshape(like.shape)


def classical_points(keys, images, codecs=("png", "jpeg", "webp", "avif", "jxl")):
    """Each classical codec over its quality sweep."""
    sweeps = {"png": [None], "jpeg": JPEG_QUALITIES, "webp": WEBP_QUALITIES, "avif": AVIF_QUALITIES,
              "jxl": JXL_QUALITIES}
    for codec in codecs:
        for quality in sweeps[codec]:
            started = time.time()
            payloads = [classical_encode(x, codec, quality) for x in images]
            encode_s = time.time() - started
            started = time.time()
            recon = [classical_decode(p, x) for p, x in zip(payloads, images)]
            decode_s = time.time() - started
            yield point(codec + (f" q{quality}" if quality is not None else ""), codec, [len(p) for p in payloads],
                        images, recon, container_bytes=container_bytes(keys, payloads),
                        encode_seconds=encode_s, decode_seconds=decode_s, quality=quality)


def point(name, family, code_bytes, images, recon, container_bytes=None, **extra):
    """One rate-distortion point: per-image rates and qualities, and their means."""
    pixels = np.array([x.shape[0] * x.shape[1] for x in images], np.float64)
    scores = np.array([psnr(x[None], y[None])[0] for x, y in zip(images, recon)])
    kind, structure = structural_similarity(images, recon)
    bpp = np.asarray(code_bytes, np.float64) * 8 / pixels
    out = {"name": name, "family": family, "images": len(images), "megapixels": float(pixels.sum() / 1e6),
           "bytes_per_image": float(np.mean(code_bytes)), "bpp": float(bpp.mean()),
           "psnr": float(scores.mean()), "psnr_min": float(scores.min()), kind: float(structure.mean()),
           "per_image": {"bpp": bpp.round(5).tolist(), "psnr": scores.round(3).tolist()}}
    if container_bytes is not None:
        out["stored_bytes"] = int(container_bytes)
        out["stored_bpp"] = float(container_bytes * 8 / pixels.sum())
    return dict(out, **extra)


def model_point(model_dir, output, input_pattern, input_format, beam_args, keys, images, index, refine=0):
    from pipeline import models

    spec = read_spec(models.resolve(model_dir))
    work = os.path.join(output, f"model-{index}")
    shutil.rmtree(work, ignore_errors=True)  # nothing from an earlier evaluation may be counted
    lat, dec = os.path.join(work, "latents"), os.path.join(work, "decoded")
    started = time.time()
    manifest = encode.run_job(encode.EncodeOptions(input=input_pattern, input_format=input_format,
                                                   model_dir=model_dir, output=lat, max_bad_fraction=1.0,
                                                   refine=refine),
                              beam_args)
    encode_s = time.time() - started
    started = time.time()
    decoded = decode.run_job(decode.DecodeOptions(input=lat, model_dir=model_dir, output=dec, output_format="npz"),
                             beam_args)
    decode_s = time.time() - started
    table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read()
    value = "code" if "code" in table.column_names else "latent"
    sizes = dict(zip(table.column("key").to_pylist(),
                     [len(v) if value == "code" else None for v in table.column(value).to_pylist()]))
    recon = {}
    for name in decoded["files"]:  # what the decode job says it wrote
        with np.load(os.path.join(dec, name)) as npz:
            recon.update(zip(npz["keys"].tolist(), npz["images"]))
    missing = [k for k in keys if k not in recon]
    if missing:
        raise LatentpackError(f"{model_dir}: {len(missing)} evaluation images did not round-trip "
                              f"(e.g. {missing[0]!r}); see {lat}/dead_letter and {dec}/dead_letter")
    total = manifest["total_bytes"]
    code_bytes = [sizes[k] if sizes[k] is not None else total / len(keys) for k in keys]
    training = spec.training
    quality = training.get("quality")
    title = f"latentpack {spec.family}" + (f" stride {spec.stride}" if spec.stride not in (None, 16) else "")
    label = (f"{title} q{quality}" if quality else
             f"{title} λ={training['lmbda']}" if training.get("lmbda") is not None else
             f"{spec.arch} autoencoder")
    family = f"latentpack-{spec.family}" if spec.entropy_coded else f"{spec.arch}-ae"
    if refine:
        label, family = f"{label} refined {refine}", f"{family}-refined"
    return point(label, family, code_bytes, images, [recon[k] for k in keys], container_bytes=total,
                 model_dir=model_dir, fingerprint=spec.fingerprint, latent_format=manifest["latent_format"],
                 encode_seconds=encode_s, decode_seconds=decode_s, refine=refine)


def bd_rate(anchor: list, test: list) -> Optional[float]:
    """Bjøntegaard delta rate of `test` against `anchor` in percent (negative: fewer bits for the
    same PSNR), over the PSNR range both curves cover; log-rate interpolated piecewise linearly
    (monotone, and defined for two points or more). None when the ranges do not overlap."""
    def curve(points):
        pts = sorted((p["psnr"], np.log(p["bpp"])) for p in points if p["bpp"] > 0 and p["psnr"] < 99)
        q = np.array([a for a, _ in pts])
        r = np.maximum.accumulate(np.array([b for _, b in pts]))  # rate never falls as quality rises
        return q, r

    qa, ra = curve(anchor)
    qt, rt = curve(test)
    if len(qa) < 2 or len(qt) < 2:
        return None
    lo, hi = max(qa.min(), qt.min()), min(qa.max(), qt.max())
    if hi - lo < 1e-6:
        return None
    grid = np.linspace(lo, hi, 200)
    diff = np.mean(np.interp(grid, qt, rt) - np.interp(grid, qa, ra))
    return float((np.exp(diff) - 1) * 100)


def bd_rates(points) -> dict:
    """{model family: {"webp": %, "jpeg": %, "avif": %, "jxl": %}} for each latentpack family with 2+ points."""
    families = {p["family"] for p in points if p["family"].startswith("latentpack")}
    out = {}
    for family in sorted(families):
        mine = [p for p in points if p["family"] == family]
        out[family] = {a: bd_rate([p for p in points if p["family"] == a], mine) for a in ("webp", "jpeg", "avif", "jxl")
                       if any(p["family"] == a for p in points)}
    return out


def markdown(points, bd: dict) -> str:
    kind = "ms_ssim" if any("ms_ssim" in p for p in points) else "ssim"
    rows = [f"| codec | bits/pixel | stored bits/pixel | bytes/image | PSNR dB (mean) | PSNR worst | "
            f"{'MS-SSIM' if kind == 'ms_ssim' else 'SSIM'} |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lossless = p["psnr"] >= 99.9
        quality = "lossless | " if lossless else f"{p['psnr']:.2f} | {p['psnr_min']:.2f}"
        rows.append(f"| {p['name']} | {p['bpp']:.3f} | {p.get('stored_bpp', p['bpp']):.3f} | "
                    f"{p['bytes_per_image']:.1f} | {quality} | {p.get(kind, float('nan')):.4f} |")
    for family, against in bd.items():
        parts = [f"{a}: {v:+.1f}%" if v is not None else f"{a}: no overlap" for a, v in against.items()]
        rows.append(f"\nBD-rate of {family} (negative = fewer bits at equal PSNR): {', '.join(parts)}")
    return "\n".join(rows)


def plot(points, path: str) -> None:
    """Rate-distortion curves: bits per pixel against PSNR, one line per codec family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"jpeg": ("s-", "C0"), "webp": ("^-", "C2"), "avif": ("v-", "C4"), "jxl": ("<-", "C8"), "mlp-ae": ("D", "C5"),
              "conv-ae": ("v", "C6")}
    for name in families.names():
        color = families.family(name).color
        styles[f"latentpack-{name}"], styles[f"latentpack-{name}-refined"] = ("o-", color), ("*--", color)
    for family in dict.fromkeys(p["family"] for p in points):
        pts = sorted((p for p in points if p["family"] == family and p["psnr"] < 99.9), key=lambda p: p["bpp"])
        if not pts:
            continue
        marker, color = styles.get(family, ("x-", "k"))
        ax.plot([p["bpp"] for p in pts], [p["psnr"] for p in pts], marker, color=color, label=family)
    for p in points:
        if p["family"] == "png":
            ax.axvline(p["bpp"], color="gray", ls=":", label=f"png (lossless, {p['bpp']:.2f} bpp)")
    lossy = [p["bpp"] for p in points if p["psnr"] < 99.9]
    if lossy:
        ax.set_xlim(0, min(max(lossy), 3.0) * 1.05)
    ax.set_xlabel("bits per pixel (mean over images)")
    ax.set_ylabel("RGB PSNR (dB, mean over images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="latentpack evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam for the encode and decode jobs.")
    p.add_argument("--input", required=True, help="glob of the evaluation images")
    p.add_argument("--input-format", default=None, choices=sorted(READERS),
                   help="format of --input (default: told from the files)")
    p.add_argument("--model-dir", action="append", default=[],
                   help="a model artifact (or a shipped model, photo:<q>); repeat for several")
    p.add_argument("--output", required=True, help="folder for rd.json, rd.md, rd.png and the jobs' outputs")
    p.add_argument("--classical", nargs="*", default=["png", "jpeg", "webp", "avif", "jxl"],
                   choices=["png", "jpeg", "webp", "avif", "jxl"], help="classical codecs to sweep (none: only models)")
    p.add_argument("--limit", type=int, help="evaluate on at most this many images (first keys)")
    p.add_argument("--refine", type=int, nargs="+", default=[0], metavar="STEPS",
                   help="encode each model with these steps of refinement (encode --refine), one curve each; "
                        "e.g. 0 50 for the model as it is and refined")
    args, beam_args = p.parse_known_args(argv)
    from pipeline.runners import check_beam_args

    check_beam_args(p, beam_args)
    return args, beam_args


def check_output(output: str, runs: int) -> None:
    """evaluate replaces what an earlier evaluation wrote in --output (its `model-<i>` job folders,
    `subset`, rd.json, rd.md, rd.png) and nothing else: a folder or file of those names that it
    did not write (a user's `model-1` model, say) is refused before anything is removed."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise LatentpackError(f"--output {output} exists and is not a folder")

    def refuse(name: str, what: str) -> None:
        raise LatentpackError(f"--output {output} holds {name}, {what}; an evaluation would replace it: "
                              "choose another --output")

    for i in range(runs):
        name = f"model-{i}"
        path = os.path.join(output, name)
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)
                                      or set(os.listdir(path)) - {"latents", "decoded"}):
            refuse(name, "which is not an earlier evaluation's encode and decode output")
    subset = os.path.join(output, "subset")
    if os.path.lexists(subset) and (os.path.islink(subset) or not os.path.isdir(subset) or any(
            not (n.startswith("subset-") and n.endswith(".npz")) for n in os.listdir(subset))):
        refuse("subset", "which is not an earlier evaluation's image subset")
    report = os.path.join(output, "rd.json")
    if os.path.lexists(report):
        try:
            with open(report) as f:
                ours = isinstance(json.load(f).get("points"), list)
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            refuse("rd.json", "which is not an earlier evaluation's report")
    else:  # no report of ours: a rd.md or rd.png there is someone else's
        for name in ("rd.md", "rd.png"):
            if os.path.lexists(os.path.join(output, name)):
                refuse(name, "which no earlier evaluation wrote (there is no rd.json of one)")


def check_input(pattern: str, input_format: str, output: str) -> None:
    """The images evaluated must not be what an evaluation writes into --output (its rd.png, its
    `subset` and `model-<i>` folders): it would read them back as test images. Other files there
    (a held-out folder the user keeps beside the report) may be evaluated."""
    import re

    from pipeline.completion import is_within

    shards, _ = get_reader(input_format).match(pattern)
    own = [os.path.join(output, name) for name in ("rd.json", "rd.md", "rd.png", "subset")]
    inside = [s for s in shards if any(is_within(s, o) for o in own)
              or (is_within(s, output) and re.match(r"model-\d+(/|$)", os.path.relpath(s, output)))]
    if inside:
        raise LatentpackError(f"--input matches files an evaluation writes into --output {output} (e.g. "
                              f"{inside[0]}); it would read its own output: choose another --output or a narrower "
                              "--input")


def run(argv=None) -> dict:
    args, beam_args = parse_args(argv)
    runs = [(model_dir, refine) for refine in dict.fromkeys(args.refine) for model_dir in args.model_dir
            if not refine or refinable(model_dir)]
    check_output(args.output, len(runs))
    from pipeline.detect import resolve_input

    args.input_format, args.input = resolve_input(args.input, args.input_format)
    check_input(args.input, args.input_format, args.output)
    os.makedirs(args.output, exist_ok=True)
    keys, images = load_eval_images(args.input, args.input_format, args.limit)
    log.info("evaluating on %d images", len(images))
    pattern = args.input
    if args.limit:
        # The jobs read exactly the evaluated images: write them as one npz per shape.
        subset = os.path.join(args.output, "subset")
        shutil.rmtree(subset, ignore_errors=True)  # an earlier evaluation's (check_output): its images were others
        pattern = write_subset(subset, keys, images)
        args.input_format = "npz"
    points = []
    for i, (model_dir, refine) in enumerate(runs):
        points.append(model_point(model_dir, args.output, pattern, args.input_format, beam_args, keys, images, i,
                                  refine))
        print(f"  {points[-1]['name']}: {points[-1]['bpp']:.3f} bpp, {points[-1]['psnr']:.2f} dB", flush=True)
    for p in classical_points(keys, images, args.classical):
        points.append(p)
        print(f"  {p['name']}: {p['bpp']:.3f} bpp, {p['psnr']:.2f} dB", flush=True)
    bd = bd_rates(points)
    report = {"images": len(images), "keys": keys, "pixels": int(sum(x.shape[0] * x.shape[1] for x in images)),
              "sizes": sorted({f"{x.shape[1]}x{x.shape[0]}" for x in images}), "points": points, "bd_rate": bd}
    with open(os.path.join(args.output, "rd.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.output, "rd.md"), "w") as f:
        f.write(markdown(points, bd) + "\n")
    plot(points, os.path.join(args.output, "rd.png"))
    return report


def refinable(model_dir: str) -> bool:
    """Whether the model's kind can be refined (`check_refine`: an entropy model and the lambda it was
    trained at); others are evaluated only as they are, with a note. A model of the right kind
    that cannot refine (a dense one exported without the signatures) is a clear error now, before
    any evaluation runs."""
    from pipeline import models
    from pipeline.codec import shared_codec

    resolved = models.resolve(model_dir)
    spec = read_spec(resolved)
    why = codec_class(spec).check_refine(spec)
    if why:
        print(f"  {model_dir}: evaluated without refinement ({why})", flush=True)
        return False
    missing = shared_codec(resolved, spec).missing_refinement()  # the encode job's check reuses it
    if missing:
        raise LatentpackError(missing)
    return True


def write_subset(folder: str, keys, images) -> str:
    os.makedirs(folder, exist_ok=True)
    by_shape = {}
    for key, image in zip(keys, images):
        by_shape.setdefault(image.shape, []).append((key, image))
    for n, (shape, items) in enumerate(sorted(by_shape.items())):
        np.savez(os.path.join(folder, f"subset-{n:04d}.npz"), images=np.stack([x for _, x in items]),
                 keys=np.array([k for k, _ in items]))
    return os.path.join(folder, "subset-*.npz")


def main(argv=None) -> int:
    show_progress()
    report = run(argv)
    print(markdown(report["points"], report["bd_rate"]))
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
