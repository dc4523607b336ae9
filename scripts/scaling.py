"""Scaling and cost of the encode job (a benchmark, not a test): images per second on the
same input with the DirectRunner (one and two worker processes) and on a Dask cluster of one
and two worker processes, then core-hours and cloud cost per million images.

    python scripts/scaling.py --out scaling-out [--mnist 300000] [--photos 240] [--repeats 3] [--record]

Each configuration runs the whole `latentpack encode` command (start-up, model load, the job,
the manifest) as a user would, against a Dask cluster that is already running (as a standing
cluster is); the configurations take turns, `--repeats` times, and the table quotes medians.
`--record` writes the table into BENCHMARKS.md between the `scaling` markers.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchkit.inputs import make_model, write_input  # noqa: E402

BSDS = os.path.join(ROOT, "..", "shared", "data", "bsds500")
# Assumed price of one vCPU-hour, with its memory: Google Cloud Dataflow batch workers in
# us-central1 at the list price on cloud.google.com/dataflow/pricing (vCPU $0.056 per hour,
# memory $0.003557 per GB-hour, n1-standard's 3.75 GB per vCPU). Check your region and discounts.
VCPU_HOUR_USD = 0.056 + 3.75 * 0.003557
CONFIGS = {
    "DirectRunner, 1 process": ["--runner=FnApiRunner"],
    "DirectRunner, 2 processes": ["--runner=FnApiRunner", "--direct_num_workers=2",
                                  "--direct_running_mode=multi_processing"],
    "Dask, 1 worker": "dask1",
    "Dask, 2 workers": "dask2",
}


def photo_input(folder: str, n: int) -> str:
    files = sorted(glob.glob(os.path.join(BSDS, "*.jpg")))[:n]
    if not files:
        return ""
    os.makedirs(folder, exist_ok=True)
    for f in files:
        dst = os.path.join(folder, os.path.basename(f))
        if not os.path.exists(dst):
            shutil.copyfile(f, dst)
    return os.path.join(folder, "*.jpg")


def encode_seconds(args: list, output: str) -> float:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [os.path.join(os.path.dirname(sys.executable), "latentpack"), "encode", "--output", output] + args
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="scaling-out")
    p.add_argument("--mnist", type=int, default=300000, help="MNIST images in the large input (16 TFRecord shards)")
    p.add_argument("--photos", type=int, default=240, help="BSDS500 photos in the large input, if present")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    cores = os.cpu_count() or 1
    model = os.path.join(a.out, "mnist-model")
    make_model(model, arch="conv", latent_dim=32, lmbda=0.02)
    # Each input at two sizes: the difference gives the rate once started (start-up, model load
    # and the job's fixed steps cancel out).
    sizes = {}
    for label, n in (("small", a.mnist // 5), ("large", a.mnist)):
        folder = os.path.join(a.out, f"mnist-{n}")
        write_input(folder, n, shards=16)
        sizes.setdefault("MNIST digits (28×28)", {})[label] = (
            ["--input", os.path.join(folder, "*.tfrecord"), "--model-dir", model], n)
    for label, n in (("small", a.photos // 5), ("large", a.photos)):
        photos = photo_input(os.path.join(a.out, f"photos-{n}"), n)
        if photos:
            sizes.setdefault("BSDS500 photos (481×321, photo:4)", {})[label] = (
                ["--input", photos, "--input-format", "images", "--model-dir", "photo:4"], len(glob.glob(photos)))
    inputs = sizes

    from distributed import LocalCluster
    clusters = {name: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR) for name, n in (("dask1", 1), ("dask2", 2))}
    seconds = {(i, size, c): [] for i in inputs for size in ("small", "large") for c in CONFIGS}
    try:
        for r in range(a.repeats):
            for i, by_size in inputs.items():
                for c, extra in CONFIGS.items():
                    if isinstance(extra, str):
                        extra = ["--runner", "DaskRunner", "--dask_client_address", clusters[extra].scheduler_address]
                    for size, (args, n) in by_size.items():
                        t = encode_seconds(args + extra, os.path.join(a.out, "latents"))
                        seconds[(i, size, c)].append(t)
                        print(f"[{r + 1}/{a.repeats}] {i}, {size} ({n}), {c}: {t:.1f} s", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.close()

    rows, result = [], {"repeats": a.repeats, "cores": cores, "vcpu_hour_usd": VCPU_HOUR_USD, "runs": {}}
    for i, by_size in inputs.items():
        (n_small, n_large) = by_size["small"][1], by_size["large"][1]
        for c in CONFIGS:
            small = statistics.median(seconds[(i, "small", c)])
            large = statistics.median(seconds[(i, "large", c)])
            rate = (n_large - n_small) / max(large - small, 1e-9)
            core_hours = 1e6 / rate * cores / 3600
            result["runs"][f"{i} | {c}"] = {"small": [n_small, seconds[(i, "small", c)]],
                                            "large": [n_large, seconds[(i, "large", c)]]}
            rows.append(f"| {i} | {c} | {n_large:,} | {large:.1f} | {n_large / large:,.0f} | {large - n_large / rate:.1f} | "
                        f"{rate:,.0f} | {core_hours:.3g} | ${core_hours * VCPU_HOUR_USD:.3g} |")
    table = "\n".join([
        f"Measured with `python scripts/scaling.py --out scaling-out --record` ({time.strftime('%Y-%m-%d')}, "
        f"the {cores}-core development machine, medians of {a.repeats} runs taking turns; whole `latentpack encode` "
        "commands against Dask clusters already running). Each input also ran at a fifth of its size: the "
        "difference gives the rate once started, and what is left of the time is start-up (Python, "
        "TensorFlow, the model, the job's fixed steps).",
        "",
        "| input | runner | images | seconds | images/s (whole command) | start-up s | images/s once started | "
        f"core-hours per million images ({cores} cores busy) | cost per million images |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Cost assumes ${VCPU_HOUR_USD:.4f} per vCPU-hour: Google Cloud Dataflow batch workers in us-central1 "
        "at the list price (cloud.google.com/dataflow/pricing: $0.056 per vCPU-hour plus $0.003557 per "
        "GB-hour for the 3.75 GB of an n1-standard vCPU); check your region, machine type and discounts. "
        "Every configuration keeps both cores busy (TensorFlow uses every core of a process), so cost "
        "counts both.",
    ])
    print(table)
    json.dump(result, open(os.path.join(a.out, "scaling.json"), "w"), indent=2)
    open(os.path.join(a.out, "scaling.md"), "w").write(table + "\n")
    if a.record:
        path = os.path.join(ROOT, "BENCHMARKS.md")
        text = open(path).read()
        begin, end = "<!-- scaling:begin -->", "<!-- scaling:end -->"
        if begin in text:
            text = text[:text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):]
        else:
            text += (f"\n## Scaling and cost\n\n`make scaling` (= `python scripts/scaling.py --out scaling-out "
                     f"--record`):\n\n{begin}\n{table}\n{end}\n")
        open(path, "w").write(text)


if __name__ == "__main__":
    main()
