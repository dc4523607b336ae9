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
import contextlib
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED_MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist", "train-images-idx3-ubyte.gz")


# ---------------------------------------------------------------- input and model

def source_images(n: int) -> np.ndarray:
    if os.path.exists(SHARED_MNIST):
        from pipeline.formats import read_idx
        base = read_idx(gzip.decompress(open(SHARED_MNIST, "rb").read()))[..., None]
    else:
        from pipeline.formats import load_mnist_sample
        base = load_mnist_sample()[0]
    return base[np.arange(n) % len(base)]


def write_input(folder: str, n: int, shards: int = 8) -> None:
    """N images as `shards` TFRecord files of PNG Examples (PNG bytes reused for repeats)."""
    from pipeline.images import encode_png
    from pipeline.tfrecord import frame, make_example

    if os.path.exists(os.path.join(folder, "_done")):
        return
    os.makedirs(folder, exist_ok=True)
    base = source_images(min(n, 60000))
    pngs = [encode_png(x) for x in base]
    for s, part in enumerate(np.array_split(np.arange(n), shards)):
        with open(os.path.join(folder, f"part-{s:05d}-of-{shards:05d}.tfrecord"), "wb") as f:
            for i in part:
                f.write(frame(make_example(pngs[i % len(pngs)], f"img/{i:07d}", int(i % 10))))
    open(os.path.join(folder, "_done"), "w").close()


def make_model(model_dir: str, **config) -> None:
    if os.path.exists(os.path.join(model_dir, "codec.json")):
        return
    from pipeline.formats import load_mnist_sample
    from training.train import TrainConfig, train
    # Throughput does not depend on how well the model is trained: one epoch is enough.
    train(TrainConfig(epochs=1, **config), load_mnist_sample()[0], model_dir)


# ---------------------------------------------------------------- the variants (run in child processes)

def encode_loop(pattern: str, model_dir: str, output: str) -> None:
    import pyarrow.parquet as pq

    from pipeline import latents
    from pipeline.codecs import load_codec
    from pipeline.formats import get_reader
    from pipeline.images import ImageBatch, batch_records

    codec = load_codec(model_dir)
    latent_format = codec.default_latent_format(codec.spec)
    schema = latents.schema(codec.spec, latent_format)
    reader = get_reader("tfrecord")
    shards, root = reader.match(pattern)
    os.makedirs(output, exist_ok=True)
    with pq.ParquetWriter(os.path.join(output, "latents-00000-of-00001.parquet"), schema, compression="zstd") as w:
        for shard in shards:
            for item in batch_records(reader.records(shard, root), codec.image_shape(codec.spec), 1024):
                if isinstance(item, ImageBatch):
                    columns = codec.compress(item, latent_format)
                    w.write_table(latents.to_table(item.keys, columns, item.labels, item.has_label, schema))


def encode_steps(pattern: str, model_dir: str) -> None:
    """Time each step of the encode work separately over the whole input, start-up excluded."""
    from pipeline import latents
    from pipeline.codecs import load_codec
    from pipeline.formats import get_reader
    from pipeline.images import batch_records
    from PIL import Image

    codec = load_codec(model_dir)
    reader = get_reader("tfrecord")
    shards, root = reader.match(pattern)
    list(reader.records(shards[0], root))  # first use imports the Example proto; keep it out of the timing
    latent_format = codec.default_latent_format(codec.spec)
    schema = latents.schema(codec.spec, latent_format)
    times = {}

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - started
        return result

    records = timed("read TFRecord framing, parse Examples", lambda: [r for s in shards for r in reader.records(s, root)])
    batches = timed("decode PNGs into batches",
                    lambda: list(batch_records(iter(records), codec.image_shape(codec.spec), 1024)))
    timed("model encode (alone, for the split below)", lambda: [codec.encode(b.images) for b in batches])
    values = timed("model encode + entropy coding (compress)", lambda: [codec.compress(b, latent_format)
                                                                        for b in batches])
    timed("Arrow tables", lambda: [latents.to_table(b.keys, v, b.labels, b.has_label, schema)
                                   for b, v in zip(batches, values)])
    # Not part of the job: what the PNG step costs through Pillow instead of libspng.
    timed("(for comparison) decode PNGs with Pillow",
          lambda: [np.asarray(Image.open(io.BytesIO(r.encoded))) for r in records if r.encoded is not None])
    for name, seconds in times.items():
        print(f"{name:<42} {seconds / len(records) * 1e6:6.1f} us/image")


def decode_loop(dataset: str, model_dir: str, output: str, output_format: str = "png") -> None:
    """The decode job's work in a plain loop: one PNG file per image, or one TFRecord shard of
    PNG Examples per Parquet part."""
    import pyarrow.parquet as pq

    from pipeline import completion, latents, tfrecord
    from pipeline.codecs import load_codec
    from pipeline.images import encode_png

    codec = load_codec(model_dir)
    os.makedirs(output, exist_ok=True)
    for n, path in enumerate(latents.part_paths(dataset, completion.read_manifest(dataset))):
        with contextlib.ExitStack() as stack:
            shard = (stack.enter_context(open(os.path.join(output, f"images-{n:05d}.tfrecord"), "wb"))
                     if output_format == "tfrecord" else None)
            for rb in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for batch in codec.decompress(rb):
                    for key, image, label, has in zip(batch.keys, batch.images, batch.labels, batch.has_label):
                        label = int(label) if has else None
                        if shard:
                            shard.write(tfrecord.frame(tfrecord.make_example(encode_png(image), key, label)))
                        else:
                            target = os.path.join(output, key + ".png")
                            os.makedirs(os.path.dirname(target), exist_ok=True)
                            with open(target, "wb") as f:
                                f.write(encode_png(image))


def file_creation(folder: str, n: str = "20000", deleted: str = "60000") -> None:
    """Microseconds to create a small file: in a new folder, then right after deleting `deleted`
    other files (ext4 scans past recently freed inodes). Run it after a few quiet minutes."""
    payload = bytes(550)  # about one decoded MNIST PNG

    def create(sub, count):
        path = os.path.join(folder, sub)
        os.makedirs(path)
        started = time.perf_counter()
        for i in range(count):
            with open(os.path.join(path, f"{i:07d}.png"), "wb") as f:
                f.write(payload)
        elapsed = time.perf_counter() - started
        os.sync()
        return elapsed / count * 1e6

    print(f"create {int(n):,} files in a new folder                    {create('quiet', int(n)):6.1f} us/file")
    create("doomed", int(deleted))
    shutil.rmtree(os.path.join(folder, "doomed"))
    os.sync()
    print(f"create {int(n):,} files just after deleting {int(deleted):,} others    "
          f"{create('after', int(n)):6.1f} us/file")
    shutil.rmtree(folder)


def encode_naive(pattern: str, model_dir: str, output: str) -> None:
    """What a new user writes from Beam's RunInference examples: one image per element."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

    # Written as a user new to the codebase would: Pillow to decode, the SavedModel's `encode`
    # signature loaded with TensorFlow, tf.train.Example to parse; none of latentpack's helpers.
    class SavedModelHandler(ModelHandler):
        def load_model(self):
            import tensorflow as tf
            return tf.saved_model.load(model_dir).signatures["encode"]

        def run_inference(self, batch, model, inference_args=None):
            return list(model(images=np.stack(batch))["latent"].numpy())

    def parse(record):
        import io

        from PIL import Image
        from tensorflow.core.example import example_pb2
        feature = example_pb2.Example.FromString(record).features.feature
        key = feature["image/key"].bytes_list.value[0].decode()
        image = np.array(Image.open(io.BytesIO(feature["image/encoded"].bytes_list.value[0])))
        return key, image[..., None]

    schema = pa.schema([("key", pa.string()), ("latent", pa.list_(pa.int8()))])
    # Default options, as for the `beam` variant (BENCH_NO_PRISM pins the in-process runner for both).
    with beam.Pipeline(argv=["--runner=FnApiRunner"] if os.environ.get("BENCH_NO_PRISM") else []) as p:
        (p | beam.io.ReadFromTFRecord(pattern)
           | beam.Map(parse)
           | RunInference(KeyedModelHandler(SavedModelHandler()))
           | beam.MapTuple(lambda key, latent: {"key": key, "latent": latent.tolist()})
           | beam.io.WriteToParquet(os.path.join(output, "latents"), schema, codec="zstd"))


# ---------------------------------------------------------------- measuring

def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(cmd: list) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak[0] / 2 ** 20}


def variant_command(name: str, inputs: str, model: str, out: str, latents_dir: str,
                    rd_model: str = "", rd_latents: dict = None) -> list:
    py = [sys.executable]
    runner = ["--runner=FnApiRunner"] if os.environ.get("BENCH_NO_PRISM") else []
    if name in ("beam-int", "beam-code"):  # the same rate-distortion model, both latent formats
        return py + ["-m", "pipeline.encode", "--input", inputs, "--model-dir", rd_model, "--output", out,
                     "--latent-format", name[5:]] + runner
    if name in ("dec-beam-int", "dec-beam-code"):
        return py + ["-m", "pipeline.decode", "--input", rd_latents[name[9:]], "--model-dir", rd_model,
                     "--output", out, "--output-format", "tfrecord"] + runner
    if name == "loop":
        return py + [__file__, "--child", "encode-loop", inputs, model, out]
    if name == "beam":
        return py + ["-m", "pipeline.encode", "--input", inputs, "--model-dir", model, "--output", out] + runner
    if name == "beam-2w":
        return py + ["-m", "pipeline.encode", "--input", inputs, "--model-dir", model, "--output", out,
                     "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    if name in ("naive", "naive-4x"):  # on its own, smaller input (see run_bench)
        return py + [__file__, "--child", "encode-naive", inputs, model, out]
    if name in ("dec-loop", "dec-loop-tfr"):
        return py + [__file__, "--child", "decode-loop", latents_dir, model, out,
                     "tfrecord" if name.endswith("tfr") else "png"]
    if name == "dec-beam":
        return py + ["-m", "pipeline.decode", "--input", latents_dir, "--model-dir", model, "--output", out] + runner
    if name == "dec-beam-tfr":
        return py + ["-m", "pipeline.decode", "--input", latents_dir, "--model-dir", model, "--output", out,
                     "--output-format", "tfrecord"] + runner
    raise ValueError(name)


def run_bench(args) -> dict:
    work = os.path.abspath(args.out)
    model = os.path.join(work, "model")
    make_model(model)
    rd_model = os.path.join(work, "rd-model")
    if any("int" in v or "code" in v for v in args.variants):
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
            subprocess.run(variant_command("beam", pattern, model, latents_dir, ""), cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rd_latents = {}
        for fmt in ("int", "code"):
            rd_latents[fmt] = os.path.join(work, f"rd-latents-{fmt}-{n}")
            if any(fmt in v for v in args.variants) and not os.path.exists(
                    os.path.join(rd_latents[fmt], "_manifest.json")):
                subprocess.run(variant_command(f"beam-{fmt}", pattern, model, rd_latents[fmt], "", rd_model),
                               cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The naive pipeline runs on inputs of its own, N/4 and 4N/4 images, and its steady rate is the
        # slope between the two (start-up cancels out).
        naive_n = max(1, n // args.naive_fraction)
        naive_inputs = {}
        for v, k in (("naive", naive_n), ("naive-4x", 4 * naive_n)):
            if v in args.variants and n == sizes[0]:
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
                m = measure(variant_command(v, inp, model, out, latents_dir, rd_model, rd_latents))
                m["images"] = images
                m["images_per_s"] = m["images"] / m["wall_s"]
                runs[v].append(m)
                print(f"n={n} repeat {r + 1}/{args.repeats} {v:<13} {m['images_per_s']:9.0f} img/s "
                      f"{m['wall_s']:7.1f} s {m['peak_rss_mb']:7.0f} MB", flush=True)
        results[n] = {v: {k: statistics.median(x[k] for x in ms) for k in ms[0]} | {"runs": ms}
                      for v, ms in runs.items()}
    return {"sizes": sizes, "results": results, "ratios": ratios(results, sizes)}


# (numerator, denominator, name) of images/s ratios; for code/int, images/s of int over code is
# the time of code over int.
RATIO_PAIRS = [("beam", "loop", "beam/loop encode"), ("beam-2w", "beam", "beam-2w/beam"),
               ("dec-beam", "dec-loop", "beam/loop decode png"),
               ("dec-beam-tfr", "dec-loop-tfr", "beam/loop decode tfrecord"),
               ("beam-int", "beam-code", "encode time code/int"),
               ("dec-beam-int", "dec-beam-code", "decode time code/int")]


def ratios(results: dict, sizes: list) -> dict:
    def ips(n, v):
        return results[n].get(v, {}).get("images_per_s")

    out = {}
    for n in sizes:
        r = {}
        for a, b, name in RATIO_PAIRS + [("beam", "naive-4x", "beam/naive-4x (both on N images)")]:
            if ips(n, a) and ips(n, b):
                r[name] = ips(n, a) / ips(n, b)
        out[n] = r
    # Steady rates: the slope between two sizes of the same variant, so start-up (Python, TensorFlow,
    # the model, pipeline construction) cancels out.
    def slope(a, b):
        return (b["images"] - a["images"]) / max(b["wall_s"] - a["wall_s"], 1e-9)

    steady = {}
    first = results[sizes[0]]
    if "naive" in first and "naive-4x" in first:
        steady["naive"] = slope(first["naive"], first["naive-4x"])
    if len(sizes) == 2:
        for v in results[sizes[1]]:
            if v in first:
                steady[v] = slope(first[v], results[sizes[1]][v])
    out["steady"] = steady
    s_ratios = {}
    # naive's steady rate comes from its own two sizes (naive, naive-4x).
    for a, b, name in RATIO_PAIRS + [("beam", "naive", "beam/naive")]:
        if a in steady and b in steady:
            s_ratios[name] = steady[a] / steady[b]
    out["steady_ratios"] = s_ratios
    if len(sizes) == 2:
        small, big = sizes
        out["growth"] = {v: {"time_ratio": results[big][v]["wall_s"] / results[small][v]["wall_s"],
                             "memory_ratio": results[big][v]["peak_rss_mb"] / results[small][v]["peak_rss_mb"]}
                         for v in results[big] if v in results[small]}
    return out


def markdown(report: dict) -> str:
    lines = ["| images | variant | images/s | wall s | peak RSS MB |", "|---:|---|---:|---:|---:|"]
    for n in report["sizes"]:
        for v, m in report["results"][n].items():
            lines.append(f"| {m['images']:,} | {v} | {m['images_per_s']:,.0f} | {m['wall_s']:.1f} | "
                         f"{m['peak_rss_mb']:,.0f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    for n in report["sizes"]:
        for name, value in report["ratios"][n].items():
            lines.append(f"| {name} (N={n:,}, whole process) | {value:.2f} |")
    for name, value in report["ratios"].get("steady_ratios", {}).items():
        lines.append(f"| {name} (steady rate) | {value:.2f} |")
    steady = report["ratios"].get("steady", {})
    if steady:
        lines += ["", "| variant | steady images/s (slope between sizes) |", "|---|---:|"]
        lines += [f"| {v} | {r:,.0f} |" for v, r in steady.items()]
    growth = report["ratios"].get("growth", {})
    if growth:
        lines += ["", "| growth | value |", "|---|---:|"]
    for v, g in growth.items():
        lines.append(f"| {v}: time at 10N / time at N | {g['time_ratio']:.2f} |")
        lines.append(f"| {v}: peak memory at 10N / at N | {g['memory_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=60000, help="images at the base size")
    p.add_argument("--scale", type=int, default=10, help="second size is scale x n (1: only n)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant per size")
    p.add_argument("--naive-fraction", type=int, default=4,
                   help="the naive variant encodes n / this images (and naive-4x four times as many)")
    p.add_argument("--variants", nargs="+", default=["loop", "beam", "beam-2w", "naive", "naive-4x", "dec-loop",
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
        {"encode-loop": encode_loop, "decode-loop": decode_loop,
         "encode-naive": encode_naive, "encode-steps": encode_steps, "file-creation": file_creation}[kind](*rest)
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
