"""Throughput benchmark: the Beam jobs against a plain loop, side by side in one run.

    python scripts/bench.py --n 60000 --scale 10 --repeats 3      (what `make bench` runs)

Builds N MNIST images as 8 TFRecord shards of PNG Examples (from ../shared/data/mnist
when present, else the embedded sample tiled to N) and the same at scale x N, then
runs each variant in its own process, alternating variants within each repeat:

  loop         a single-process loop doing the encode job's work (read, decode PNG,
               SavedModel encode, write the same Parquet schema)
  beam         latentpack encode, DirectRunner defaults
  beam-2w      the same with --direct_num_workers 2 --direct_running_mode multi_processing
  naive        one image per element, stock RunInference batching, WriteToParquet of dicts
               (on its own input of N / naive-fraction images; naive-4x on four times as many)
  dec-loop / dec-beam            decode to one PNG file per image (loop, Beam)
  dec-loop-tfr / dec-beam-tfr    decode to TFRecord shards of PNG Examples (loop, Beam)
  beam-int / beam-code, dec-beam-int / dec-beam-code
               one rate-distortion model, its latents stored as integers or as entropy-coded codes
               (not in the default set: `--variants beam-int beam-code dec-beam-int dec-beam-code`)

`--child encode-steps PATTERN MODEL` times each step of the encode work per image;
`--child file-creation FOLDER` times creating files before and after a mass deletion.

Reports images/s, wall time and peak resident memory of the whole process tree
(medians), and ratios computed within the run, as JSON and Markdown: of whole-process
rates, and of steady rates (images per second of the slope between a variant's two sizes,
in which start-up cancels out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from benchkit.children import CHILDREN  # noqa: E402
from benchkit.inputs import make_model, write_input  # noqa: E402
from benchkit.measure import measure  # noqa: E402
from benchkit.report import markdown, ratios  # noqa: E402
from benchkit.variants import VARIANTS, Context  # noqa: E402


def run_bench(args) -> dict:
    work = os.path.abspath(args.out)
    model = os.path.join(work, "model")
    make_model(model)
    rd_model = os.path.join(work, "rd-model")
    if any(VARIANTS[v].needs_rd_model for v in args.variants):
        make_model(rd_model, lmbda=0.02, latent_dim=64)
    sizes = [args.n, args.n * args.scale] if args.scale > 1 else [args.n]
    scratch = os.path.join(work, "scratch")
    if os.path.exists(scratch):
        print(f"removing {scratch} from an earlier run (file creation is slower for a few minutes after)",
              flush=True)
        shutil.rmtree(scratch)
    results = {}
    for n in sizes:
        inputs = os.path.join(work, f"input-{n}")
        write_input(inputs, n)
        pattern = os.path.join(inputs, "*.tfrecord")
        latents_dir = os.path.join(work, f"latents-{n}")
        if not os.path.exists(os.path.join(latents_dir, "_manifest.json")):
            subprocess.run(VARIANTS["beam"].command(Context(pattern, model, latents_dir, "")), cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rd_latents = {}
        for fmt in ("int", "code"):
            rd_latents[fmt] = os.path.join(work, f"rd-latents-{fmt}-{n}")
            if any(v in (f"beam-{fmt}", f"dec-beam-{fmt}") for v in args.variants) and not os.path.exists(
                    os.path.join(rd_latents[fmt], "_manifest.json")):
                subprocess.run(VARIANTS[f"beam-{fmt}"].command(Context(pattern, model, rd_latents[fmt], "",
                                                                       rd_model)),
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The naive pipeline runs on inputs of its own, N/4 and 4N/4 images, and its steady rate is the
        # slope between the two (start-up cancels out).
        naive_n = max(1, n // args.naive_fraction)
        naive_inputs = {}
        for v in args.variants:
            k = VARIANTS[v].naive_input * naive_n
            if k and n == sizes[0]:
                write_input(os.path.join(work, f"input-{k}"), k)
                naive_inputs[v] = (os.path.join(work, f"input-{k}", "*.tfrecord"), k)
        variants = args.variants if n == sizes[0] else [v for v in args.large_variants if v in args.variants]
        runs = {v: [] for v in variants}
        for r in range(args.repeats):
            for v in variants:  # alternate variants within a repeat: drift hits them alike
                # Every run writes to a new folder, and nothing is deleted until all runs are done:
                # ext4 scans past recently deleted inodes when it creates a file, which made creating
                # 60,000 PNG files 3-10x slower for minutes after the previous run's were deleted,
                # a penalty for whichever variant came next.
                out = os.path.join(scratch, f"{n}-r{r + 1}-{v}")
                os.sync()  # flush the last run's writes (60,000 PNG files) so they do not slow this one
                inp, images = naive_inputs.get(v, (pattern, n))
                m = measure(VARIANTS[v].command(Context(inp, model, out, latents_dir, rd_model, rd_latents)))
                m["images"] = images
                m["images_per_s"] = m["images"] / m["wall_s"]
                runs[v].append(m)
                print(f"n={n} repeat {r + 1}/{args.repeats} {v:<13} {m['images_per_s']:9.0f} img/s "
                      f"{m['wall_s']:7.1f} s {m['peak_rss_mb']:7.0f} MB", flush=True)
        results[n] = {v: {k: statistics.median(x[k] for x in ms) for k in ms[0]} | {"runs": ms}
                      for v, ms in runs.items()}
    return {"sizes": sizes, "results": results, "ratios": ratios(results, sizes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=60000, help="images at the base size")
    p.add_argument("--scale", type=int, default=10, help="second size is scale x n (1: only n)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant per size")
    p.add_argument("--naive-fraction", type=int, default=4,
                   help="the naive variant encodes n / this images (and naive-4x four times as many)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["loop", "beam", "beam-2w", "naive", "naive-4x", "dec-loop",
                                                     "dec-beam", "dec-loop-tfr", "dec-beam-tfr"],
                   help="which variants to run")
    p.add_argument("--large-variants", nargs="+", default=["loop", "beam", "beam-2w", "dec-loop", "dec-beam",
                                                           "dec-loop-tfr", "dec-beam-tfr"],
                   help="variants also run at scale x n (naive has its own two sizes, N/4 and N)")
    p.add_argument("--out", default="bench-out", help="work folder (inputs and the model are reused)")
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep every run's output under OUT/scratch/N-rREPEAT-VARIANT (by default removed at the end)")
    p.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--section", default="bench", help="the marked section of BENCHMARKS.md that --record replaces")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        CHILDREN[kind](*rest)
        return 0
    report = run_bench(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    table = markdown(report)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    if args.record:
        from record import replace_section
        command = " ".join(["python scripts/bench.py"] + sys.argv[1:])
        replace_section(args.section, f"Measured with `{command}` ({time.strftime('%Y-%m-%d')}); medians of "
                                 f"{args.repeats} alternating repeats. Images per second are whole-process figures: "
                                 f"they include starting Python, importing TensorFlow and loading the model "
                                 f"(about 10 s per process).\n\n{table}")
    if not args.keep_outputs:
        print(f"removing the runs' outputs under {args.out}/scratch", flush=True)
        shutil.rmtree(os.path.join(args.out, "scratch"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
