"""Encode image shards into a latent Parquet dataset (an Apache Beam batch job).

    latentpack encode --input 'shards/*.tfrecord' --input-format tfrecord \
        --model-dir model/ --output latents/ [Beam options, e.g. --runner DataflowRunner]

EncodeImages (each input shard, or a run of an image folder's files, read and encoded on one
worker, in batches of same-shaped images) -> WriteLatentDataset (or, with --skip-existing,
WriteNewShards). The model is loaded once per worker process and called only through its
family's `compress`, so the job knows nothing of quantizers, tables or latent shapes. The graph
uses only Create, ParDo, GroupByKey and Flatten, so one graph runs on the DirectRunner, Dask and
the portable runner (Flink, Spark, Dataflow).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import posixpath
import sys
from typing import List, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import keys, latents, sinks
from pipeline.accounting import DEFAULT_MAX_BAD_FRACTION, Progress, summary
from pipeline.artifact import read_spec
from pipeline.codec import codec_class, schema_of, shared_codec
from pipeline.completion import MANIFEST, OutputFolder, is_within, run_to_completion, stored_json
from pipeline.errors import BadImage, LatentpackError
from pipeline.formats import READERS, Fields, open_input, shown
from pipeline.images import DEFAULT_MAX_PIXELS, DeadLetter, batch_records
from pipeline.detect import resolve_input
from pipeline.runners import check_beam_args, either_spelling, runner_options
from pipeline.errors import log, show_progress

NAMESPACE = "latentpack.encode"
MAX_REFINE = 10000  # steps of --refine: beyond this an encode job would run for days for nothing


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """The encode job's own settings (Beam's options travel separately)."""

    input: str
    model_dir: str
    output: str
    input_format: Optional[str] = None  # None: told from the files (pipeline.detect)
    latent_format: Optional[str] = None
    batch_size: int = 1024
    num_shards: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    skip_existing: bool = False
    embed_model: str = "auto"  # store the model in <output>/_model/: auto (not shipped), always, never
    duplicate_keys: str = "keep-first"
    image_feature: Optional[str] = None
    label_feature: Optional[str] = None
    key_feature: Optional[str] = None
    refine: int = 0


def unit_batches(reader, unit, root: str, shape, batch_size: int, max_pixels: int):
    """The records of a unit of work, `unit` = [(shard, later)] in shard order, as ImageBatches and
    DeadLetters, in record order (batches may hold images of several shards). `shape` is the
    model's one image shape, or None for models that take any size (then batches group images of
    the same shape). `later` maps the record index of each later occurrence of a key in that shard
    to its first occurrence's (place, index): those records become `duplicate_key` dead letters."""
    records = itertools.chain.from_iterable(_drop_later_duplicates(reader.records(shard, root), later)
                                            for shard, later in unit)
    yield from batch_records(records, tuple(shape) if shape is not None else None, batch_size, max_pixels)


def _drop_later_duplicates(records, later):
    if not later:
        yield from records
        return
    for rec in records:
        first = later.get(rec.index)
        if first is not None and rec.error is None:
            rec.error = BadImage("duplicate_key",
                                 f"key also at {first[0]}:{first[1]}; only the first input of a key is encoded")
        yield rec


def _key_buckets(shard: str, reader, root: str):
    """shard -> (bucket, (shard, keys, indexes)) for its readable records."""
    return keys.bucketed(shard, reader.keys(shard, root))


# Keys already stored in the output's older parts (--skip-existing) come first, before any shard:
# "(" sorts before "/" and letters, so their places win min().
EXISTING = "(existing part) "


def _part_key_buckets(part: str):
    """An existing part -> (bucket, (place, keys, rows)) for the keys it stores."""
    name = EXISTING + part.rsplit("/", 1)[-1]
    return keys.bucketed(name, ((key, i) for i, key in enumerate(keys.stored_keys(part))))


def _in_this_run(place: str) -> bool:
    return not place.startswith(EXISTING)


class FindDuplicateKeys(beam.PTransform):
    """Shards -> (shard, (record index, (place, index) of the key's first occurrence)) for every
    later occurrence of a key. Reads keys only (no pixels) and groups them by a hash bucket, so no
    worker holds them all; keys already stored in `existing_parts` count as first occurrences."""

    def __init__(self, reader, root: str, existing_parts=()):
        super().__init__()
        self.reader, self.root, self.existing_parts = reader, root, list(existing_parts)

    def expand(self, shards):
        buckets = shards | "KeyBuckets" >> beam.FlatMap(_key_buckets, self.reader, self.root)
        if self.existing_parts:
            stored = (shards.pipeline
                      | "ListExistingParts" >> beam.Create(self.existing_parts)
                      | "StoredKeyBuckets" >> beam.FlatMap(_part_key_buckets))
            buckets = (buckets, stored) | "AllKeyBuckets" >> beam.Flatten()
        return (buckets
                | "GroupBuckets" >> beam.GroupByKey()
                | "LaterOccurrences" >> beam.FlatMap(keys.later_occurrences, _in_this_run))


def work_units(part_of: dict, files: int = 1, max_bytes: int = 0, sizes: Optional[dict] = None) -> dict:
    """shard -> unit of work (an int): consecutive shards of one part, a unit closing once it holds
    `files` shards or `max_bytes` of input (a shard of unknown size counts as 0 bytes). A unit is
    read and encoded on one worker, its images batched together: the files of an image folder
    then share batches (one model call for many small images) instead of one call per file."""
    sizes = sizes or {}
    unit_of, unit, part, count, size = {}, -1, None, files, max_bytes
    for shard in sorted(part_of):
        if part_of[shard] != part or count >= files or (max_bytes and size >= max_bytes):
            unit, part, count, size = unit + 1, part_of[shard], 0, 0
        unit_of[shard] = unit
        count, size = count + 1, size + (sizes.get(shard) or 0)
    return unit_of


def _by_unit(element):
    """(shard, {plan: [(part, unit)], later: [(index, first)]}) -> (unit, (shard, part, later))."""
    shard, joined = element
    ((part, unit),) = joined["plan"]
    return unit, (shard, part, list(joined["later"]))


class EncodeUnit(beam.DoFn):
    """(unit, [(shard, part, later)]) -> (part, item) for each Arrow table of encoded rows and each
    dead letter of the unit's shards, then (part, ShardDone) for each of them. The model is loaded
    once per worker process and called only through its family's `compress`."""

    def __init__(self, reader, root: str, model_dir: str, spec, latent_format: str, batch_size: int,
                 max_pixels: int, refine: int = 0):
        self.reader, self.root = reader, root
        self.model_dir, self.spec, self.latent_format = model_dir, spec, latent_format
        self.batch_size, self.max_pixels, self.refine = batch_size, max_pixels, refine
        self.sizes, self.total_bytes = {}, 0  # input bytes per shard (EncodeImages sets them: progress)

    def setup(self):
        self.codec = shared_codec(self.model_dir, self.spec)
        self.shape = codec_class(self.spec).image_shape(self.spec)
        self.schema = schema_of(self.spec, self.latent_format, self.reader.extra_fields())
        self.images = Metrics.counter(NAMESPACE, "images_written")
        self.progress = Progress("encoded", total=self.total_bytes, unit="input bytes")

    def process(self, element):
        _, entries = element
        entries = sorted(entries, key=lambda e: e[0])
        (part,) = {p for _, p, _ in entries}  # a unit never spans parts (`work_units`)
        unit = [(shard, dict(later)) for shard, _, later in entries]
        for item in unit_batches(self.reader, unit, self.root, self.shape, self.batch_size, self.max_pixels):
            if isinstance(item, DeadLetter):
                yield part, item
                continue
            columns = self.codec.compress(item, self.latent_format, self.refine)
            yield part, latents.to_table(item.keys, columns, item.labels, item.has_label, self.schema, item.extras)
            self.images.inc(len(item))
            self.progress.add(len(item), work=0)
        for shard, _ in unit:
            self.progress.add(0, work=int(self.sizes.get(shard, 0) or 0))
            yield part, sinks.ShardDone(shard)


class EncodeImages(beam.PTransform):
    """The planned shards -> (part, item) pairs: spread the shards over workers, find keys seen
    twice, gather the shards into units of work (`work_units`, per the reader's `unit_files` and
    `unit_bytes`), read and encode each unit on one worker."""

    def __init__(self, part_of: dict, reader, root: str, model_dir: str, spec, latent_format: str,
                 batch_size: int = 1024, max_pixels: int = DEFAULT_MAX_PIXELS, existing_parts=(), refine: int = 0):
        super().__init__()
        self.part_of, self.existing_parts = dict(part_of), list(existing_parts)
        self.unit_of = work_units(self.part_of, reader.unit_files, reader.unit_bytes, reader.sizes)
        self.reader, self.root = reader, root
        self.fn = EncodeUnit(reader, root, model_dir, spec, latent_format, batch_size, max_pixels, refine)
        self.fn.sizes = {s: int(reader.sizes.get(s, 0) or 0) for s in self.part_of}
        self.fn.total_bytes = sum(self.fn.sizes.values())

    def expand(self, pbegin):
        planned = (pbegin
                   | "ListShards" >> beam.Create(sorted((shard, (part, self.unit_of[shard]))
                                                        for shard, part in self.part_of.items()))
                   # Without it, a runner may read every shard in the bundle that listed them.
                   | "SpreadShards" >> beam.Reshuffle())
        later = (planned
                 | "Shards" >> beam.Keys()
                 | "FindDuplicateKeys" >> FindDuplicateKeys(self.reader, self.root, self.existing_parts))
        return ({"plan": planned, "later": later}
                | "JoinDuplicates" >> beam.CoGroupByKey()
                | "ByUnit" >> beam.Map(_by_unit)
                | "GatherUnits" >> beam.GroupByKey()
                | "ReadAndEncode" >> beam.ParDo(self.fn))


def parse_args(argv) -> tuple:
    """argv -> (EncodeOptions, Beam's arguments)."""
    p = argparse.ArgumentParser(prog="latentpack encode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam (--runner, --direct_num_workers, ...).")
    d = EncodeOptions("", "", "")
    p.add_argument("--input", help="glob of input shards, local or on any Beam filesystem (gs://, s3://)")
    p.add_argument("--input-format", default=d.input_format, choices=sorted(READERS),
                   help="format of --input (default: told from the files' bytes; a Hugging Face save_to_disk "
                        "folder may be given as --input itself)")
    p.add_argument("--model-dir", required=True,
                   help="model artifact directory (from latentpack train), or a shipped model: photo:<q> (1, 2, 4, 6)")
    p.add_argument("--output", required=True, help="directory for the latent dataset")
    p.add_argument("--latent-format", choices=latents.LATENT_FORMATS,
                   help="code: entropy-coded bytes per image (the compact default for models trained with "
                        "--quality/--lambda); int: the integer latents, usable as features (default for other models)")
    p.add_argument("--image-feature", help="TFRecord feature or Parquet/Arrow column holding the image bytes "
                                           "(default: detected: image/encoded, image, or the one image-bytes field)")
    p.add_argument("--label-feature", help="feature or column holding the integer label "
                                           "(default: image/class/label or label, or the dataset's class label)")
    p.add_argument("--key-feature", help="feature or column holding each image's key (default: image/key or key; "
                                         "otherwise the file and record index)")
    p.add_argument("--refine", type=int, default=d.refine, metavar="STEPS",
                   help="steps of encoder-side refinement: search each image's latents for a better rate-distortion "
                        "trade-off than the encoder's (slower encoding, same decoder and code format; any model "
                        "with an entropy model: photos about 14 s per megapixel at 25 steps on 2 cores; 0: off)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per batch element")
    p.add_argument("--num-shards", type=int, default=d.num_shards,
                   help="output Parquet parts, each of whole input shards (0: one per input shard; for image folders, "
                        "parts of at least 256 files and 16 MiB)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="reject images with more pixels than this, before decoding them")
    p.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                   help="fail the job, leaving the output unmarked, if more than this fraction of inputs is bad")
    p.add_argument("--embed-model", choices=["auto", "always", "never"], default=d.embed_model,
                   help="store the model inside the dataset (_model/), so that decode needs no --model-dir: auto "
                        "for a model that is not shipped, always (also a shipped one: archives that must outlive "
                        "releases), never")
    p.add_argument("--skip-existing", action="store_true",
                   help="incremental: encode only the input shards that no part in --output holds yet (for this "
                        "model and latent format), into new parts; the manifest covers every part in --output")
    p.add_argument("--duplicate-keys", choices=["keep-first", "fail"], default=d.duplicate_keys,
                   help="a key seen again: keep its first occurrence (by shard, then record index) and "
                        "dead-letter the others, or fail the job")
    args, beam_args = p.parse_known_args(either_spelling(p, sys.argv[1:] if argv is None else list(argv)))
    check_beam_args(p, beam_args)
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
    if options.max_pixels < 1:
        raise LatentpackError(f"--max-pixels must be at least 1 (got {options.max_pixels}); it is the largest "
                              "image, in pixels, that is decoded (larger ones are dead letters)")
    if not 0 <= options.refine <= MAX_REFINE:
        raise LatentpackError(f"--refine must be 0 to {MAX_REFINE} steps (got {options.refine})")
    if options.num_shards is not None and options.num_shards < 0:
        raise LatentpackError(f"--num-shards must be 0 (as many parts as the job plans) or more (got {options.num_shards})")
    if not (0.0 <= options.max_bad_fraction <= 1.0):  # NaN fails this too
        raise LatentpackError(f"--max-bad-fraction must be a fraction from 0 to 1 (got {options.max_bad_fraction})")
    if options.skip_existing and options.num_shards:
        raise LatentpackError("--num-shards cannot apply with --skip-existing (its parts are planned among the new shards)")
    from pipeline import models
    model_dir = models.resolve(options.model_dir)
    spec = read_spec(model_dir)
    family = codec_class(spec)
    latent_format = options.latent_format or family.default_latent_format(spec)
    why_not = family.check_latent_format(spec, latent_format)
    if why_not:
        raise LatentpackError(f"{why_not}; {model_dir} cannot write --latent-format {latent_format}")
    if options.refine:
        # The worker's own copy, when the runner is in process: loaded once (`shared_codec`).
        why_not = family.check_refine(spec) or shared_codec(model_dir, spec).missing_refinement()
        if why_not:
            raise LatentpackError(why_not)
    input_format, pattern = resolve_input(options.input, options.input_format)
    if input_format != options.input_format:
        log.info("--input-format %s (told from the files)", input_format)
        options = dataclasses.replace(options, input_format=input_format, input=pattern)
    reader, shards, root = open_input(options.input_format, options.input,
                                      Fields(options.image_feature, options.label_feature, options.key_feature))
    output = options.output.rstrip("/")
    inside = [shown(shard) for shard in shards if is_within(shown(shard), output)]
    if inside:
        raise LatentpackError(f"--input matches files inside --output {output} (e.g. {inside[0]}); the job would read "
                              "its own output: choose another --output or a narrower --input")
    claim = OutputFolder(output, "encode")
    claim.claim()
    log.info("encoding %d shard(s) of %s with model %s", len(shards), options.input_format, spec.fingerprint[:19])
    extra = {"job": "encode", "input": options.input, "input_format": options.input_format, "shards": len(shards),
             "latent_format": latent_format, "duplicate_keys": options.duplicate_keys, "refine": options.refine,
             "max_pixels": options.max_pixels,
             # the input files' bytes (every matched shard): the summary's "N× smaller"
             "input_bytes": sum(int(reader.sizes.get(s, 0) or 0) for s in shards),
             "hidden_files_skipped": len(getattr(reader, "hidden", [])),
             "codec": latents.metadata_of(schema_of(spec, latent_format)),
             # Which shipped model, of which release: a later release may ship a better (different) one.
             "model": options.model_dir if models.is_shipped_name(options.model_dir) else None,
             "latentpack_version": models.package_version()}
    if reader.label_names():  # class names the input declares (TFDS, Hugging Face): decode's Parquet keeps them
        extra["label_names"] = reader.label_names()
    if reader.extra_fields():  # the input's other columns, kept beside the codes (the manifest lists those
        extra["extra_columns"] = [f.name for f in reader.extra_fields()]  # some part holds values of)
    fatal = ("duplicate_key",) if options.duplicate_keys == "fail" else ()
    try:
        if options.embed_model == "always" or (options.embed_model == "auto"
                                               and models.find(spec.fingerprint) is None):
            extra["embedded_model"] = {"folder": models.EMBEDDED,
                                       "bytes": models.embed(model_dir, output, spec.fingerprint)}
        return _build_and_run(options, beam_args, test_pipeline, spec, model_dir, latent_format, reader, shards,
                              root, output, extra, fatal, claim)
    finally:
        claim.release()


def _build_and_run(options, beam_args, test_pipeline, spec, model_dir, latent_format, reader, shards, root, output,
                   extra, fatal, claim):
    if options.skip_existing:
        # The manifest covers the older parts too: its pixel limit (decode's default) is the largest
        # any run into the folder applied (encode's default for runs before it was recorded).
        earlier = stored_json(posixpath.join(output, MANIFEST))
        if earlier is not None:
            before = earlier.get("max_pixels")
            extra = dict(extra, max_pixels=max(options.max_pixels, before if isinstance(before, int)
                                               else DEFAULT_MAX_PIXELS))
        sink = sinks.WriteNewShards(output, spec, latent_format, extra, options.max_bad_fraction, fatal,
                                    reader.part_files, reader.part_bytes, reader.sizes)
    else:
        sink = sinks.WriteLatentDataset(output, spec, latent_format, extra, options.num_shards,
                                        options.max_bad_fraction, fatal, reader.part_files, reader.part_bytes,
                                        reader.sizes)
    sink.stamps = dict(reader.stamps)
    sink.extra_fields = tuple(reader.extra_fields())
    sink.prepare(shards)
    p = test_pipeline or beam.Pipeline(options=runner_options(beam_args, len(shards)))
    # With --skip-existing, keys already stored in the folder's older parts count as first occurrences.
    (p
     | "EncodeImages" >> EncodeImages(sink.part_of, reader, root, model_dir, spec, latent_format,
                                      options.batch_size, options.max_pixels, sink.existing, options.refine)
     | "WriteLatentDataset" >> sink)
    return run_to_completion(p, output, claim=claim)


def _size_summary(manifest: dict) -> str:
    """", 0.52 bits per pixel, 9.8x smaller than the input files" where the dataset tells."""
    out = ""
    pixels = manifest.get("pixels")
    if pixels:
        out += f", {8 * manifest['total_bytes'] / pixels:.3f} bits per pixel"
    if manifest.get("input_bytes") and manifest.get("total_bytes") and not manifest.get("incremental"):
        out += f", {manifest['input_bytes'] / manifest['total_bytes']:.1f}x smaller than the input files"
    return out


def main(argv=None) -> int:
    show_progress()
    manifest = run(argv)
    night = manifest.get("this_run")
    if night is not None:  # --skip-existing: this run's own inputs, then the whole dataset
        print(f"this run: {night['written']} new images, {night['dead_lettered']} dead letters "
              f"{night['dead_lettered_by_reason'] or ''}".rstrip()
              + f"; the dataset: {manifest['images']} images in {len(manifest['files'])} part(s)")
    model = manifest.get("embedded_model")
    print(summary(manifest, f"encoded {manifest['images']} images into {len(manifest['files'])} part(s), "
                            f"{manifest['total_bytes'] / max(manifest['images'], 1):.1f} bytes per image"
                            + _size_summary(manifest)
                            + (f" (and the model, {model['bytes'] / 1e6:.2f} MB once, in {model['folder']}/)"
                               if model else "")))
    if manifest.get("extra_columns"):
        print(f"kept the input's other column(s) beside the codes: {', '.join(manifest['extra_columns'])}")
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
