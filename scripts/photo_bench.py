"""Photo benchmarks: megapixels per second of the Beam jobs beside Pillow's codecs, and the peak
memory of one 24-megapixel photo through encode and decode.

    python scripts/photo_bench.py --model photo:4 --out bench-out/photos [--record]

Speed: the evaluation photos (held-out BSDS500 images from ../shared/data/bsds500, the
same split training never sees; scikit-image's bundled photos when that is absent)
through `latentpack encode` and `latentpack decode` (each a fresh process, the real
DirectRunner path with --runner=FnApiRunner), whole-process time and with start-up taken
away (each command's own start-up: the same command on one 64x64 image), next to JPEG
q75, WebP q75 method 6, AVIF q60 speed 6 and PNG at the zlib level decode writes and at
Pillow's default on the same images in one process; repeated, medians quoted. Memory: a 6000x4000 photo
(a held-out photo upscaled) encoded and decoded in a child process each; peak RSS from
the kernel's accounting (ru_maxrss of the child).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BSDS = os.path.join(ROOT, "..", "shared", "data", "bsds500")
SMALL_REFINE = 25  # steps for the small images' refined encode


def held_out_photos(limit: int) -> list:
    """Paths of held-out evaluation photos: BSDS500 images in training's held-out split."""
    sys.path.insert(0, ROOT)
    from training.data import holdout_files

    if os.path.isdir(BSDS):
        return holdout_files(BSDS)[:limit]
    import photo_demo
    return photo_demo.photo_files()[:limit]


def beam(argv: list) -> list:
    """The in-process runner for the Beam jobs (the default DirectRunner may try to fetch Prism)."""
    return argv + (["--runner=FnApiRunner"] if argv[0] in ("encode", "decode") else [])


def latentpack(argv: list) -> float:
    """Run the latentpack command in a fresh process; seconds it took."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "latentpack.cli"] + beam(argv), cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def pillow_speed(images: list) -> dict:
    """Encode and decode megapixels per second of Pillow's codecs on the same images."""
    sys.path.insert(0, ROOT)
    from pipeline.images import DECODED_PNG_LEVEL

    mpx = sum(x.shape[0] * x.shape[1] for x in images) / 1e6
    out = {}
    for name, fmt, kw in (("JPEG q75", "JPEG", {"quality": 75}), ("WebP q75 m6", "WEBP", {"quality": 75, "method": 6}),
                          ("AVIF q60 s6", "AVIF", {"quality": 60, "speed": 6}),
                          (f"PNG zlib {DECODED_PNG_LEVEL} (what decode writes)", "PNG",
                           {"compress_level": DECODED_PNG_LEVEL}),
                          ("PNG zlib 6 (Pillow's default)", "PNG", {"compress_level": 6})):
        started = time.perf_counter()
        payloads = []
        for x in images:
            buf = io.BytesIO()
            Image.fromarray(x).save(buf, format=fmt, **kw)
            payloads.append(buf.getvalue())
        enc = time.perf_counter() - started
        started = time.perf_counter()
        for p in payloads:
            np.asarray(Image.open(io.BytesIO(p)).convert("RGB"))
        dec = time.perf_counter() - started
        out[name] = {"encode_mpx_s": mpx / enc, "decode_mpx_s": mpx / dec,
                     "bpp": sum(len(p) for p in payloads) * 8 / (mpx * 1e6)}
    return out


def speed(model: str, out: str, n: int, repeats: int, refine: int) -> dict:
    photos = held_out_photos(n)
    folder = os.path.join(out, "speed-photos")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    images = []
    for path in photos:
        x = np.asarray(Image.open(path).convert("RGB"))
        images.append(x)
        Image.fromarray(x).save(os.path.join(folder, os.path.basename(path)[:-4] + ".png"))
    mpx = sum(x.shape[0] * x.shape[1] for x in images) / 1e6
    runs = {"encode": [], "decode": [], "pillow": []}
    for r in range(repeats):
        lat, dec = os.path.join(out, "speed-latents"), os.path.join(out, "speed-decoded")
        shutil.rmtree(lat, ignore_errors=True)
        shutil.rmtree(dec, ignore_errors=True)
        runs["encode"].append(latentpack(["encode", "--input", f"{folder}/*.png", "--input-format", "images",
                                          "--model-dir", model, "--output", lat]))
        runs["decode"].append(latentpack(["decode", "--input", lat, "--model-dir", model, "--output", dec]))
        runs["pillow"].append(pillow_speed(images))
        print(f"speed run {r + 1}/{repeats}: encode {runs['encode'][-1]:.1f} s, decode {runs['decode'][-1]:.1f} s "
              f"for {mpx:.2f} Mpx", flush=True)
    refined_s = None
    if refine:  # one run: minutes, and the search dominates it
        lat = os.path.join(out, "speed-refined")
        shutil.rmtree(lat, ignore_errors=True)
        refined_s = latentpack(["encode", "--input", f"{folder}/*.png", "--input-format", "images",
                                "--model-dir", model, "--output", lat, "--refine", str(refine)])
        print(f"refined encode (--refine {refine}): {refined_s:.1f} s for {mpx:.2f} Mpx", flush=True)
    small_s = None
    if refine:  # small images arriving together (a run of an image folder's files) are searched together
        small = os.path.join(out, "speed-small")
        shutil.rmtree(small, ignore_errors=True)
        os.makedirs(small)
        for i in range(256):  # 256 crops of 32x32, as PNG files in one folder
            image = images[i % len(images)]
            y, x = (i * 37) % (image.shape[0] - 32), (i * 53) % (image.shape[1] - 32)
            Image.fromarray(image[y:y + 32, x:x + 32]).save(os.path.join(small, f"s{i:03d}.png"))
        lat = os.path.join(out, "speed-small-refined")
        shutil.rmtree(lat, ignore_errors=True)
        small_s = latentpack(["encode", "--input", f"{small}/*.png", "--input-format", "images",
                              "--model-dir", model, "--output", lat, "--refine", str(SMALL_REFINE)])
    # Start-up of each job: the same command on one 64x64 image (Python, TensorFlow, Beam, the model).
    tiny = os.path.join(out, "speed-tiny")
    shutil.rmtree(tiny, ignore_errors=True)
    os.makedirs(tiny)
    Image.fromarray(images[0][:64, :64]).save(os.path.join(tiny, "tiny.png"))
    ups = {"encode": [], "decode": []}
    for _ in range(repeats):
        for path in (tiny + "-latents", tiny + "-decoded"):
            shutil.rmtree(path, ignore_errors=True)
        ups["encode"].append(latentpack(["encode", "--input", f"{tiny}/*.png", "--input-format", "images",
                                         "--model-dir", model, "--output", tiny + "-latents"]))
        ups["decode"].append(latentpack(["decode", "--input", tiny + "-latents", "--model-dir", model,
                                         "--output", tiny + "-decoded"]))
    result = {"photos": len(images), "megapixels": mpx, "repeats": repeats}
    for what in ("encode", "decode"):
        result[f"{what}_s"] = statistics.median(runs[what])
        result[f"{what}_start_up_s"] = statistics.median(ups[what])
        result[f"{what}_mpx_s"] = mpx / result[f"{what}_s"]
        result[f"{what}_mpx_s_without_start_up"] = mpx / max(result[f"{what}_s"] - result[f"{what}_start_up_s"], 1e-9)
    start_up = result["encode_start_up_s"]
    if refined_s is not None:
        result.update(refine=refine, refined_encode_s=refined_s,
                      refined_encode_mpx_s_without_start_up=mpx / max(refined_s - start_up, 1e-9),
                      small_refine=SMALL_REFINE, small_refined_ms_per_image=1000 * (small_s - start_up) / 256)
    result["pillow"] = {name: {k: statistics.median(run[name][k] for run in runs["pillow"]) for k in run_keys}
                        for name, run_keys in ((n, runs["pillow"][0][n].keys()) for n in runs["pillow"][0])}
    return result


def peak_rss_of(argv: list) -> float:
    """Peak resident memory (GB) of a latentpack command run in a child process."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "latentpack.cli"] + beam(argv),
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024 / 1024


def camera_photo(folder: str):
    """A 6000x4000 (24 Mpx) photo, the first held-out photo upscaled, saved as `folder`/big.png
    (the folder emptied first); (its PIL image, the source photo's path)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    source = held_out_photos(1)[0]
    big = Image.open(source).convert("RGB").resize((6000, 4000), Image.BICUBIC)
    big.save(os.path.join(folder, "big.png"))
    return big, source


def memory(model: str, out: str) -> dict:
    folder = os.path.join(out, "mem-photo")
    big, source = camera_photo(folder)
    lat, dec = os.path.join(out, "mem-latents"), os.path.join(out, "mem-decoded")
    shutil.rmtree(lat, ignore_errors=True)
    shutil.rmtree(dec, ignore_errors=True)
    started = time.perf_counter()
    enc_gb = peak_rss_of(["encode", "--input", f"{folder}/*.png", "--input-format", "images", "--model-dir", model,
                          "--output", lat])
    enc_s = time.perf_counter() - started
    started = time.perf_counter()
    dec_gb = peak_rss_of(["decode", "--input", lat, "--model-dir", model, "--output", dec])
    dec_s = time.perf_counter() - started
    back = Image.open(os.path.join(dec, "big.png"))
    assert back.size == (6000, 4000), back.size
    # The fixed cost: the same command on a 64x64 image (Python, TensorFlow, Beam, the model).
    tiny = os.path.join(out, "mem-tiny")
    shutil.rmtree(tiny, ignore_errors=True)
    os.makedirs(tiny)
    big.resize((64, 64)).save(os.path.join(tiny, "tiny.png"))
    shutil.rmtree(tiny + "-latents", ignore_errors=True)
    idle_gb = peak_rss_of(["encode", "--input", f"{tiny}/*.png", "--input-format", "images", "--model-dir", model,
                           "--output", tiny + "-latents"])
    # Refinement searches large photos tile by tile; one step shows its peak (more steps repeat it).
    shutil.rmtree(lat, ignore_errors=True)
    started = time.perf_counter()
    refine_gb = peak_rss_of(["encode", "--input", f"{folder}/*.png", "--input-format", "images", "--model-dir", model,
                             "--output", lat, "--refine", "1"])
    refine_s = time.perf_counter() - started
    # Parts of many photos: sixteen mid-size photos of one size, and eight camera-size ones (the
    # decoder takes a few megapixels of rows at a time, the transforms at most 1 Mpx per call).
    parts = {}
    for name, count, size in (("batch_16_1024x768", 16, (1024, 768)), ("part_8_4000x3000", 8, (4000, 3000))):
        batch = os.path.join(out, f"mem-{name}")
        shutil.rmtree(batch, ignore_errors=True)
        os.makedirs(batch)
        for i in range(count):
            x, y = (i * 300, 0) if count == 16 else (i * 250, i * 125)
            photo = big.crop((x, y, x + size[0], y + size[1]))
            photo.save(os.path.join(batch, f"p{i:02d}.png"), compress_level=1)
        shutil.rmtree(lat, ignore_errors=True)
        shutil.rmtree(dec, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "latentpack.cli"] + beam(["encode", "--input", f"{batch}/*.png",
                       "--input-format", "images", "--model-dir", model, "--output", lat]), cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parts[f"{name}_decode_peak_rss_gb"] = peak_rss_of(["decode", "--input", lat, "--model-dir", model,
                                                            "--output", dec])
    return {"pixels": 24_000_000, "source": os.path.basename(source), "encode_peak_rss_gb": enc_gb,
            "decode_peak_rss_gb": dec_gb, "start_up_peak_rss_gb": idle_gb, "encode_s": enc_s, "decode_s": dec_s,
            "refine_1_peak_rss_gb": refine_gb, "refine_1_s": refine_s, **parts}


def markdown(result: dict, command: str) -> str:
    lines = [f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}) on the 2-core development machine."]
    if "speed" in result:
        s, after = result["speed"], []
        lines += ["", f"**Speed** on {s['photos']} held-out photographs ({s['megapixels']:.2f} Mpx in all), medians "
                      f"of {s['repeats']} runs; the jobs are whole processes (Python, TensorFlow and Beam start-up "
                      f"included; the same commands on one 64x64 image take {s['encode_start_up_s']:.1f} s "
                      f"encoding and {s['decode_start_up_s']:.1f} s decoding, subtracted in the second row):", "",
                  "| codec | encode Mpx/s | decode Mpx/s | bits/pixel |", "|---|---:|---:|---:|",
                  f"| latentpack jobs, whole process | {s['encode_mpx_s']:.2f} | {s['decode_mpx_s']:.2f} | |",
                  f"| latentpack jobs, start-up subtracted | {s['encode_mpx_s_without_start_up']:.2f} | "
                  f"{s['decode_mpx_s_without_start_up']:.2f} | |"]
        if "refine" in s:
            lines.append(f"| latentpack encode --refine {s['refine']} (one run), start-up subtracted | "
                         f"{s['refined_encode_mpx_s_without_start_up']:.3f} | | |")
            after += [f"Small images that arrive together (one shard, or a run of an image folder's files) are "
                      f"refined together: 256 crops of 32x32 from the same photos as PNG files in one folder, "
                      f"`--refine {s['small_refine']}`, {s['small_refined_ms_per_image']:.0f} ms per image "
                      f"(one run, start-up subtracted)."]
        for name, p in s["pillow"].items():
            lines.append(f"| Pillow {name} | {p['encode_mpx_s']:.2f} | {p['decode_mpx_s']:.2f} | {p['bpp']:.3f} |")
        if after:
            lines += [""] + after
    if "memory" in result:
        m = result["memory"]
        lines += ["", f"**Memory**: one 6000x4000 (24 Mpx) photo ({m['source']} upscaled): peak RSS "
                      f"{m['encode_peak_rss_gb']:.2f} GB encoding ({m['encode_s']:.0f} s), "
                      f"{m['decode_peak_rss_gb']:.2f} GB decoding ({m['decode_s']:.0f} s), against "
                      f"{m['start_up_peak_rss_gb']:.2f} GB for the same command on a 64x64 image; the transforms run in "
                      f"overlapping 1024-pixel tiles above 1 Mpx (the float64 synthesis: 768-pixel tiles above 0.59 Mpx), and "
                      f"batches of smaller photos in groups of at most that many pixels (`pipeline/codecs/spatial.py`). That is "
                      f"{24 / m['encode_s']:.1f} Mpx/s encoding and {24 / m['decode_s']:.1f} Mpx/s decoding, whole "
                      f"processes."]
        if "refine_1_peak_rss_gb" in m:
            lines[-1] += (f" Encoding it with `--refine 1` (the search goes tile by tile, 768 px with 64 px of "
                          f"context; more steps repeat the same work): {m['refine_1_peak_rss_gb']:.2f} GB peak "
                          f"({m['refine_1_s']:.0f} s).")
        if "batch_16_1024x768_decode_peak_rss_gb" in m:
            lines[-1] += (f" One part of sixteen 1024x768 photos decoded: "
                          f"{m['batch_16_1024x768_decode_peak_rss_gb']:.2f} GB peak")
            lines[-1] += (f"; one part of eight 4000x3000 photos: {m['part_8_4000x3000_decode_peak_rss_gb']:.2f} GB "
                          "peak." if "part_8_4000x3000_decode_peak_rss_gb" in m else ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="photo:4", help="shipped model name or artifact folder")
    p.add_argument("--out", default="bench-out/photos", help="work folder")
    p.add_argument("--photos", type=int, default=49, help="photos for the speed runs (49: all held-out ones)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the speed runs (medians)")
    p.add_argument("--refine", type=int, default=50, help="steps of the refined encode run (0: none)")
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory"], help="parts to leave out")
    p.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = {}
    if "memory" not in args.skip:
        result["memory"] = memory(args.model, args.out)
        print(json.dumps(result["memory"]), flush=True)
    if "speed" not in args.skip:
        result["speed"] = speed(args.model, args.out, args.photos, args.repeats, args.refine)
        print(json.dumps(result["speed"]), flush=True)
    with open(os.path.join(args.out, "photo_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    command = " ".join(["python scripts/photo_bench.py"] + (argv if argv is not None else sys.argv[1:]))
    text = markdown(result, command)
    print(text)
    if args.record:
        from record import replace_section
        replace_section("photo-bench", text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
