"""Encode image shards into a latent Parquet dataset (an Apache Beam batch job).

    latentpack encode --input 'shards/*.tfrecord' --input-format tfrecord \
        --model-dir model/ --output latents/ [Beam options, e.g. --runner DataflowRunner]

ReadImageShards -> EncodeImages -> WriteLatentDataset. Elements on the hot path are
batches of images (numpy arrays), the model is loaded once per worker in `setup()`.
"""
from __future__ import annotations

import argparse
import logging
import posixpath
import sys
import zlib

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import incremental, latents
from pipeline.accounting import (DEAD_LETTER_TAG, DEFAULT_MAX_BAD_FRACTION, Progress, WriteDeadLetters,
                                 clear_previous, counts, finish, run_to_completion, summary)
from pipeline.artifact import Codec, read_spec
from pipeline.formats import READERS, get_reader
from pipeline.images import DEFAULT_MAX_PIXELS, BadImage, DeadLetter, LatentpackError, batch_records

NAMESPACE = "latentpack.encode"


class ReadShardBatches(beam.DoFn):
    """shard path -> ImageBatch elements, and DeadLetters on the `dead_letter` output.

    `duplicates` maps each key that occurs more than once to the (source, index) of its
    first occurrence; later occurrences become `duplicate_key` dead letters.
    """

    def __init__(self, input_format: str, root: str, shape: tuple, batch_size: int, max_pixels: int):
        self.input_format, self.root, self.shape = input_format, root, tuple(shape)
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def process(self, shard: str, duplicates=None):
        reader = get_reader(self.input_format)
        records = reader.records(shard, self.root)
        if duplicates:
            records = _drop_later_duplicates(records, duplicates)
        for item in batch_records(records, self.shape, self.batch_size, self.max_pixels):
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
            else:
                yield item


def _drop_later_duplicates(records, duplicates):
    for rec in records:
        first = duplicates.get(rec.key)
        if first is not None and rec.error is None and tuple(first) != (rec.source, rec.index):
            rec.error = BadImage("duplicate_key", f"key also at {first[0]}:{first[1]}; the first one is kept")
        yield rec


def _key_buckets(shard: str, input_format: str, root: str, buckets: int = 16):
    """shard -> (bucket, [(key, source, index)]) for every readable record, bucketed by a stable hash."""
    out = [[] for _ in range(buckets)]
    for rec in get_reader(input_format).records(shard, root):
        if rec.error is None:
            out[zlib.crc32(rec.key.encode()) % buckets].append((rec.key, rec.source, rec.index))
    return [(b, entries) for b, entries in enumerate(out) if entries]


def _duplicates_in_bucket(bucket_entries):
    _, lists = bucket_entries
    seen = {}
    for entries in lists:
        for key, source, index in entries:
            seen.setdefault(key, []).append((source, index))
    for key, places in seen.items():
        if len(places) > 1:
            yield key, min(places)


class FindDuplicateKeys(beam.PTransform):
    """Shards -> one dict {key: (source, index) of its first occurrence} for keys seen twice or more.

    Reads keys only (no pixels) and groups them by a hash bucket, so no worker holds them all.
    """

    def __init__(self, input_format: str, root: str):
        super().__init__()
        self.input_format, self.root = input_format, root

    def expand(self, shards):
        return (shards
                | "KeyBuckets" >> beam.FlatMap(_key_buckets, self.input_format, self.root)
                | "GroupBuckets" >> beam.GroupByKey()
                | "Duplicates" >> beam.FlatMap(_duplicates_in_bucket)
                | "AsDict" >> beam.combiners.ToDict())


class ReadImageShards(beam.PTransform):
    """Match shards, spread them over workers, read them into image batches (+ dead letters)."""

    def __init__(self, shards, input_format, root, shape, batch_size=1024, max_pixels=DEFAULT_MAX_PIXELS,
                 check_duplicates=True):
        super().__init__()
        self.shards, self.fn = list(shards), ReadShardBatches(input_format, root, shape, batch_size, max_pixels)
        self.input_format, self.root, self.check_duplicates = input_format, root, check_duplicates

    def expand(self, pbegin):
        shards = (pbegin
                  | "ListShards" >> beam.Create(self.shards)
                  # Without it, a runner may read every shard in the bundle that listed them.
                  | "SpreadShards" >> beam.Reshuffle())
        side = []
        if self.check_duplicates:
            duplicates = shards | "FindDuplicateKeys" >> FindDuplicateKeys(self.input_format, self.root)
            side = [beam.pvalue.AsSingleton(duplicates)]
        return shards | "ReadBatches" >> beam.ParDo(self.fn, *side).with_outputs(DEAD_LETTER_TAG, main="images")


class EncodeBatch(beam.DoFn):
    """ImageBatch -> Arrow table of (key, code or latent, label); the model is loaded once per worker."""

    def __init__(self, model_dir: str, spec: dict, latent_format: str):
        self.model_dir, self.spec, self.latent_format = model_dir, spec, latent_format

    def setup(self):
        self.codec = Codec(self.model_dir, self.spec)
        self.schema = latents.schema(self.spec, self.latent_format)
        self.images = Metrics.counter(NAMESPACE, "images_written")
        self.progress = Progress("encoded")

    def process(self, batch):
        values = latents.value_array(self.codec.encode(batch.images), self.latent_format, self.codec.entropy)
        yield latents.to_table(batch.keys, values, batch.labels, batch.has_label, self.schema)
        self.images.inc(len(batch))
        self.progress.add(len(batch))


class WriteManifest(beam.DoFn):
    """Runs once, after every part is written: describe the parts and write _manifest.json."""

    def __init__(self, output: str, fingerprint: str, extra: dict, max_bad_fraction: float, fatal_reasons=()):
        self.output, self.fingerprint, self.extra = output, fingerprint, extra
        self.max_bad_fraction, self.fatal_reasons = max_bad_fraction, tuple(fatal_reasons)

    def process(self, _, parts, rows, reasons, dead_letter_files):
        described = latents.describe_parts(parts)
        payload = latents.manifest(described, counts(rows, reasons), self.fingerprint, self.extra)
        payload["dead_letter_files"] = sorted(posixpath.relpath(p, self.output) for p in dead_letter_files)
        finish(self.output, payload, self.max_bad_fraction, self.fatal_reasons)
        yield payload


class WriteLatentDataset(beam.PTransform):
    """Tables + dead letters -> Parquet parts, dead-letter JSONL, then `_manifest.json` last."""

    def __init__(self, output: str, spec: dict, latent_format: str, extra: dict, num_shards: int = 0,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, fatal_reasons=()):
        super().__init__()
        self.output, self.spec, self.extra, self.num_shards = output, spec, extra, num_shards
        self.latent_format, self.max_bad_fraction, self.fatal_reasons = latent_format, max_bad_fraction, fatal_reasons

    def expand(self, inputs):
        tables, dead_letters = inputs
        parts = tables | "WriteParquet" >> beam.io.Write(latents.LatentParquetSink(
            posixpath.join(self.output, latents.PART_PREFIX), latents.schema(self.spec, self.latent_format),
            self.latent_format, self.num_shards))
        rows = (tables | "Rows" >> beam.Map(lambda t: t.num_rows)
                | "SumRows" >> beam.CombineGlobally(sum))
        reasons, dead_files = dead_letters | "WriteDeadLetters" >> WriteDeadLetters(self.output, NAMESPACE)
        side = beam.pvalue
        return (tables.pipeline
                | "Once" >> beam.Create([None])
                | "WriteManifest" >> beam.ParDo(
                    WriteManifest(self.output, self.spec["fingerprint"], self.extra, self.max_bad_fraction,
                                  self.fatal_reasons),
                    side.AsList(parts), side.AsSingleton(rows), side.AsSingleton(reasons), side.AsList(dead_files)))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="latentpack encode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam (--runner, --direct_num_workers, ...).")
    p.add_argument("--input", help="glob of input shards, local or on any Beam filesystem (gs://, s3://)")
    p.add_argument("--input-format", default="tfrecord", choices=sorted(READERS), help="format of --input")
    p.add_argument("--model-dir", required=True, help="model artifact directory (from latentpack train)")
    p.add_argument("--output", required=True, help="directory for the latent dataset")
    p.add_argument("--latent-format", choices=latents.LATENT_FORMATS,
                   help="code: entropy-coded bytes per image (the compact default for models trained with "
                        "--quality/--lambda); int: the integer latents, usable as features (default for other models)")
    p.add_argument("--batch-size", type=int, default=1024, help="images per batch element")
    p.add_argument("--num-shards", type=int, default=0, help="output Parquet parts (0: the runner decides)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="reject images with more pixels than this, before decoding them")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="fail the job, leaving the output unmarked, if more than this fraction of inputs is bad")
    p.add_argument("--skip-existing", action="store_true",
                   help="incremental: one output part per input shard, skipping shards whose part already exists "
                        "for this model; the manifest covers every part in --output")
    p.add_argument("--duplicate-keys", choices=["keep-first", "fail"], default="keep-first",
                   help="a key seen again: keep its first occurrence (by shard, then record index) and "
                        "dead-letter the others, or fail the job")
    return p.parse_known_args(argv)


def run(argv=None, test_pipeline=None):
    """Build and run the encode job; returns the manifest dict."""
    args, beam_args = parse_args(argv)
    spec = read_spec(args.model_dir)
    latent_format = args.latent_format or ("code" if "entropy_model" in spec else "int")
    if latent_format == "code" and "entropy_model" not in spec:
        raise LatentpackError(f"--latent-format code needs a model trained with --quality or --lambda; "
                              f"{args.model_dir} has no entropy model (use --latent-format int)")
    reader = get_reader(args.input_format)
    shards, root = reader.match(args.input)
    output = args.output.rstrip("/")
    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
    logging.info("encoding %d shard(s) of %s with model %s", len(shards), args.input_format, spec["fingerprint"][:19])
    extra = {"input": args.input, "input_format": args.input_format, "shards": len(shards),
             "latent_format": latent_format, "duplicate_keys": args.duplicate_keys,
             "codec": {k: spec[k] for k in ("image_shape", "latent_dim", "latent_dtype")}}
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    if args.skip_existing:
        # Parts of earlier runs stay; only unfinished temporary files go.
        clear_previous(output, [f"{latents.PART_PREFIX}-*.parquet.tmp", "dead_letter/*.jsonl.tmp"])
        incremental.build(p, shards, args, spec, latent_format, root, output, extra)
        return run_to_completion(p, output)
    clear_previous(output, [f"{latents.PART_PREFIX}-*.parquet", "dead_letter/*.jsonl"])
    read = p | "ReadImageShards" >> ReadImageShards(
        shards, args.input_format, root, spec["image_shape"], args.batch_size, args.max_pixels)
    tables = read.images | "EncodeImages" >> beam.ParDo(EncodeBatch(args.model_dir, spec, latent_format))
    (tables, read[DEAD_LETTER_TAG]) | "WriteLatentDataset" >> WriteLatentDataset(
        output, spec, latent_format, extra, args.num_shards, args.max_bad_fraction,
        fatal_reasons=("duplicate_key",) if args.duplicate_keys == "fail" else ())
    return run_to_completion(p, output)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = run(argv)
    print(summary(manifest, f"encoded {manifest['images']} images into {len(manifest['files'])} part(s), "
                            f"{manifest['total_bytes'] / max(manifest['images'], 1):.1f} bytes per image"))
    return 0


if __name__ == "__main__":
    from pipeline.cli import guarded
    sys.exit(guarded(main)())
