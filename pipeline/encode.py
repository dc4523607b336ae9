"""Encode image shards into a latent Parquet dataset (an Apache Beam batch job).

    latentpack encode --input 'shards/*.tfrecord' --input-format tfrecord \
        --model-dir model/ --output latents/ [Beam options, e.g. --runner DataflowRunner]

ReadImageShards -> EncodeImages -> WriteLatentDataset (or, with --skip-existing,
WritePartPerShard). Elements on the hot path are batches of same-shaped images; the
model is loaded once per worker in `setup()` and called only through its family's
`compress`, so the job knows nothing of quantizers, tables or latent shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import latents, sinks
from pipeline.accounting import DEAD_LETTER_TAG, DEFAULT_MAX_BAD_FRACTION, Progress, summary
from pipeline.artifact import read_spec
from pipeline.codecs import codec_class, load_codec
from pipeline.completion import OutputFolder, run_to_completion
from pipeline.errors import BadImage, LatentpackError
from pipeline.formats import READERS, get_reader
from pipeline.images import DEFAULT_MAX_PIXELS, DeadLetter, batch_records
from pipeline.errors import log, show_progress

NAMESPACE = "latentpack.encode"


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """The encode job's own settings (Beam's options travel separately)."""

    input: str
    model_dir: str
    output: str
    input_format: str = "tfrecord"
    latent_format: Optional[str] = None
    batch_size: int = 1024
    num_shards: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    skip_existing: bool = False
    duplicate_keys: str = "keep-first"


class ReadShardBatches(beam.DoFn):
    """shard path -> ImageBatch elements, and DeadLetters on the `dead_letter` output.

    `shape` is the model's one image shape, or None for models that take any size (then
    batches group images of the same shape). `duplicates` maps each key that occurs more
    than once to the (source, index) of its first occurrence; later occurrences become
    `duplicate_key` dead letters.
    """

    def __init__(self, input_format: str, root: str, shape, batch_size: int, max_pixels: int):
        self.input_format, self.root = input_format, root
        self.shape = tuple(shape) if shape is not None else None
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
                item.shard = shard
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
            out[zlib.crc32(rec.key.encode("utf-8", "surrogatepass")) % buckets].append((rec.key, rec.source, rec.index))
    return [(b, entries) for b, entries in enumerate(out) if entries]


# Keys already stored in the output's older parts (--skip-existing) come first, before any shard:
# "(" sorts before "/" and letters, so their places win min().
EXISTING = "(existing part) "


def _part_key_buckets(part: str, buckets: int = 16):
    """An existing part -> (bucket, [(key, place, row)]) for every key it stores."""
    import pyarrow.parquet as pq

    out = [[] for _ in range(buckets)]
    with FileSystems.open(part) as f:
        keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
    name = EXISTING + part.rsplit("/", 1)[-1]
    for i, key in enumerate(keys):
        out[zlib.crc32(key.encode("utf-8", "surrogatepass")) % buckets].append((key, name, i))
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

    def __init__(self, input_format: str, root: str, existing_parts=()):
        super().__init__()
        self.input_format, self.root, self.existing_parts = input_format, root, list(existing_parts)

    def expand(self, shards):
        buckets = shards | "KeyBuckets" >> beam.FlatMap(_key_buckets, self.input_format, self.root)
        if self.existing_parts:
            stored = (shards.pipeline
                      | "ListExistingParts" >> beam.Create(self.existing_parts)
                      | "StoredKeyBuckets" >> beam.FlatMap(_part_key_buckets))
            buckets = (buckets, stored) | "AllKeyBuckets" >> beam.Flatten()
        return (buckets
                | "GroupBuckets" >> beam.GroupByKey()
                | "Duplicates" >> beam.FlatMap(_duplicates_in_bucket)
                | "AsDict" >> beam.combiners.ToDict())


class ReadImageShards(beam.PTransform):
    """Match shards, spread them over workers, read them into image batches (+ dead letters)."""

    def __init__(self, shards, input_format, root, shape, batch_size=1024, max_pixels=DEFAULT_MAX_PIXELS,
                 check_duplicates=True, existing_parts=()):
        super().__init__()
        self.shards, self.fn = list(shards), ReadShardBatches(input_format, root, shape, batch_size, max_pixels)
        self.input_format, self.root, self.check_duplicates = input_format, root, check_duplicates
        self.existing_parts = list(existing_parts)

    def expand(self, pbegin):
        shards = (pbegin
                  | "ListShards" >> beam.Create(self.shards)
                  # Without it, a runner may read every shard in the bundle that listed them.
                  | "SpreadShards" >> beam.Reshuffle())
        side = []
        if self.check_duplicates:
            duplicates = shards | "FindDuplicateKeys" >> FindDuplicateKeys(self.input_format, self.root,
                                                                            self.existing_parts)
            side = [beam.pvalue.AsSingleton(duplicates)]
        return shards | "ReadBatches" >> beam.ParDo(self.fn, *side).with_outputs(DEAD_LETTER_TAG, main="images")


class EncodeBatch(beam.DoFn):
    """ImageBatch -> (shard, Arrow table of key, the codec's columns, label); the model is loaded
    once per worker."""

    def __init__(self, model_dir: str, spec, latent_format: str):
        self.model_dir, self.spec, self.latent_format = model_dir, spec, latent_format

    def setup(self):
        self.codec = load_codec(self.model_dir, self.spec)
        self.schema = latents.schema(self.spec, self.latent_format)
        self.images = Metrics.counter(NAMESPACE, "images_written")
        self.progress = Progress("encoded")

    def process(self, batch):
        columns = self.codec.compress(batch, self.latent_format)
        yield batch.shard, latents.to_table(batch.keys, columns, batch.labels, batch.has_label, self.schema)
        self.images.inc(len(batch))
        self.progress.add(len(batch))


def parse_args(argv) -> tuple:
    """argv -> (EncodeOptions, Beam's arguments)."""
    p = argparse.ArgumentParser(prog="latentpack encode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam (--runner, --direct_num_workers, ...).")
    d = EncodeOptions("", "", "")
    p.add_argument("--input", help="glob of input shards, local or on any Beam filesystem (gs://, s3://)")
    p.add_argument("--input-format", default=d.input_format, choices=sorted(READERS), help="format of --input")
    p.add_argument("--model-dir", required=True,
                   help="model artifact directory (from latentpack train), or a shipped model: photo:<1-8>")
    p.add_argument("--output", required=True, help="directory for the latent dataset")
    p.add_argument("--latent-format", choices=latents.LATENT_FORMATS,
                   help="code: entropy-coded bytes per image (the compact default for models trained with "
                        "--quality/--lambda); int: the integer latents, usable as features (default for other models)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per batch element")
    p.add_argument("--num-shards", type=int, default=d.num_shards, help="output Parquet parts (0: the runner decides)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="reject images with more pixels than this, before decoding them")
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help="fail the job, leaving the output unmarked, if more than this fraction of inputs is bad")
    p.add_argument("--skip-existing", action="store_true",
                   help="incremental: one output part per input shard, skipping shards whose part already exists "
                        "for this model; the manifest covers every part in --output")
    p.add_argument("--duplicate-keys", choices=["keep-first", "fail"], default=d.duplicate_keys,
                   help="a key seen again: keep its first occurrence (by shard, then record index) and "
                        "dead-letter the others, or fail the job")
    args, beam_args = p.parse_known_args(argv)
    fields = {f.name for f in dataclasses.fields(EncodeOptions)}
    return EncodeOptions(**{k: v for k, v in vars(args).items() if k in fields}), beam_args


def run(argv=None, test_pipeline=None):
    """Parse argv and run the encode job; returns the manifest dict."""
    options, beam_args = parse_args(argv)
    return run_job(options, beam_args, test_pipeline)


def run_job(options: EncodeOptions, beam_args: List[str] = (), test_pipeline=None) -> dict:
    """Build and run the encode job; returns the manifest dict."""
    if options.batch_size < 1:
        raise LatentpackError(f"--batch-size must be at least 1 (got {options.batch_size})")
    if options.skip_existing and options.num_shards:
        raise LatentpackError("--num-shards cannot apply with --skip-existing (it writes one part per input shard)")
    from pipeline import models
    model_dir = models.resolve(options.model_dir)
    spec = read_spec(model_dir)
    family = codec_class(spec)
    latent_format = options.latent_format or family.default_latent_format(spec)
    why_not = family.check_latent_format(spec, latent_format)
    if why_not:
        raise LatentpackError(f"{why_not}; {model_dir} cannot write --latent-format {latent_format}")
    reader = get_reader(options.input_format)
    shards, root = reader.match(options.input)
    output = options.output.rstrip("/")
    inside = [shard for shard in shards if shard.startswith(output + "/")]
    if inside:
        raise LatentpackError(f"--input matches files inside --output {output} (e.g. {inside[0]}); the job would read "
                              "its own output: choose another --output or a narrower --input")
    claim = OutputFolder(output, "encode")
    claim.claim()
    log.info("encoding %d shard(s) of %s with model %s", len(shards), options.input_format, spec.fingerprint[:19])
    extra = {"job": "encode", "input": options.input, "input_format": options.input_format, "shards": len(shards),
             "latent_format": latent_format, "duplicate_keys": options.duplicate_keys,
             "codec": latents.metadata_of(latents.schema(spec, latent_format))}
    fatal = ("duplicate_key",) if options.duplicate_keys == "fail" else ()
    try:
        return _build_and_run(options, beam_args, test_pipeline, spec, family, model_dir, latent_format, shards, root,
                              output, extra, fatal, claim)
    finally:
        claim.release()


def _build_and_run(options, beam_args, test_pipeline, spec, family, model_dir, latent_format, shards, root, output,
                   extra, fatal, claim):
    if options.skip_existing:
        sink = sinks.WritePartPerShard(output, spec, latent_format, extra, options.max_bad_fraction, fatal)
        shards = sink.prepare(shards)
    else:
        sink = sinks.WriteLatentDataset(output, spec, latent_format, extra, options.num_shards,
                                        options.max_bad_fraction, fatal)
        sink.prepare(shards)
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
    # With --skip-existing, keys already stored in the folder's older parts count as first occurrences.
    read = p | "ReadImageShards" >> ReadImageShards(
        shards, options.input_format, root, family.image_shape(spec), options.batch_size, options.max_pixels,
        existing_parts=getattr(sink, "existing", ()))
    tables = read.images | "EncodeImages" >> beam.ParDo(EncodeBatch(model_dir, spec, latent_format))
    (tables, read[DEAD_LETTER_TAG]) | "WriteLatentDataset" >> sink
    return run_to_completion(p, output, claim=claim)


def main(argv=None) -> int:
    show_progress()
    manifest = run(argv)
    print(summary(manifest, f"encoded {manifest['images']} images into {len(manifest['files'])} part(s), "
                            f"{manifest['total_bytes'] / max(manifest['images'], 1):.1f} bytes per image"))
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
