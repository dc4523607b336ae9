"""Decode a latent dataset back into images (an Apache Beam batch job).

    latentpack decode --input latents/ --model-dir model/ --output images/ --output-format png

ReadLatentDataset -> DecodeLatents -> Write<format>. Refuses a dataset made with a
different model (fingerprint mismatch) or one that is incomplete (no manifest).
"""
from __future__ import annotations

import argparse
import dataclasses
import posixpath
import sys

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import latents
from pipeline.accounting import (DEAD_LETTER_TAG, DEFAULT_MAX_BAD_FRACTION, Progress, WriteDeadLetters, counts,
                                 finish, summary)
from pipeline.artifact import read_spec
from pipeline.codecs import codec_class, load_codec
from pipeline.completion import MANIFEST, OutputFolder, clear_previous, read_manifest, run_to_completion
from pipeline.errors import LatentpackError
from pipeline.images import DeadLetter
from pipeline.outputs import WRITERS
from pipeline.errors import show_progress

NAMESPACE = "latentpack.decode"


def check_dataset(dataset_dir: str, spec) -> tuple:
    """Validate a latent dataset against the model; returns (part paths, their manifest entries)."""
    manifest = read_manifest(dataset_dir)
    if manifest.get("format") != "latentpack-dataset":
        raise LatentpackError(f"{dataset_dir}: {MANIFEST} is not a latentpack dataset manifest")
    check_fingerprint(posixpath.join(dataset_dir, MANIFEST), manifest.get("model_fingerprint"), spec)
    paths = latents.part_paths(dataset_dir, manifest)
    family = codec_class(spec)
    # Sizes and row counts here, before anything is written; checksums in the workers.
    latents.require_intact(dataset_dir, paths, manifest["files"], checksums=False)
    for path in paths:
        try:
            with FileSystems.open(path) as f:
                schema = pq.read_schema(f)
        except Exception as e:
            raise LatentpackError(f"{path}: not a readable Parquet file ({e})") from None
        try:
            meta = latents.metadata_of(schema)
            fingerprint, latent_format = meta["model_fingerprint"], meta.get("latent_format", "int")
            version = meta.get("format_version", 1)
        except (LatentpackError, KeyError, ValueError, TypeError, AttributeError):
            raise LatentpackError(f"{path}: not a latentpack dataset part (no latentpack metadata)") from None
        if version not in latents.READABLE_VERSIONS:
            raise LatentpackError(f"{path}: dataset format version {version!r} is not readable by this latentpack")
        check_fingerprint(path, fingerprint, spec)
        why_not = family.check_latent_format(spec, latent_format)
        if why_not:
            raise LatentpackError(f"{path}: latent format {latent_format!r} cannot be decoded with this model")
        for field in latents.schema(spec, latent_format):
            if field.name not in schema.names:
                raise LatentpackError(f"{path}: lacks the {field.name!r} column")
            if schema.field(field.name).type != field.type:
                raise LatentpackError(f"{path}: column {field.name!r} is {schema.field(field.name).type}, "
                                      f"the model needs {field.type}")
    return paths, manifest["files"]


def check_fingerprint(path: str, fingerprint: str, spec) -> None:
    if fingerprint != spec.fingerprint:
        raise LatentpackError(
            f"{path} was encoded with model {fingerprint}, but --model-dir {spec.fingerprint} is "
            "a different model; decode it with the model that encoded it")


class ReadVerifiedParts(beam.DoFn):
    """(path, manifest entry) -> the part's rows as Arrow tables of at most BATCH_ROWS rows, after
    checking its bytes against the manifest's CRC32C. A part that fails the check becomes one
    `damaged_part` dead letter per row the manifest gives it; its rows are never decoded."""

    BATCH_ROWS = 1024

    def process(self, element):
        path, expected = element
        problem = latents.check_part(path, expected)
        if problem:
            name = posixpath.basename(path)
            for i in range(int(expected.get("rows", 1))):
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
                    f"{name}:{i}", path, i, "damaged_part", f"{name} {problem}"))
            return
        with FileSystems.open(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self.BATCH_ROWS):
                yield pa.Table.from_batches([batch])


class DecodeTable(beam.DoFn):
    """Arrow table of rows -> ImageBatches of same-shaped images (and a dead letter per row that
    does not decode), with the model loaded once per worker and called only through `decompress`."""

    def __init__(self, model_dir: str, spec):
        self.model_dir, self.spec = model_dir, spec

    def setup(self):
        self.codec = load_codec(self.model_dir, self.spec)
        self.images = Metrics.counter(NAMESPACE, "images_decoded")
        self.progress = Progress("decoded")

    def process(self, table):
        for item in self.codec.decompress(table):
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
                continue
            self.images.inc(len(item))
            self.progress.add(len(item))
            yield item


class WriteDecodeManifest(beam.DoFn):
    def __init__(self, output: str, extra: dict, max_bad_fraction: float, fatal_reasons=()):
        self.output, self.extra, self.max_bad_fraction = output, extra, max_bad_fraction
        self.fatal_reasons = tuple(fatal_reasons)

    def process(self, _, written, reasons, files, dead_letter_files):
        payload = dict(self.extra, format="latentpack-decoded", complete=True, images=written,
                       counts=counts(written, reasons),
                       files=sorted(posixpath.relpath(p, self.output) for p in files),
                       dead_letter_files=sorted(posixpath.relpath(p, self.output) for p in dead_letter_files))
        finish(self.output, payload, self.max_bad_fraction, self.fatal_reasons)
        yield payload


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The decode job's own settings (Beam's options travel separately)."""

    input: str
    model_dir: str
    output: str
    output_format: str = "png"
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    allow_damaged: bool = False


def parse_args(argv) -> tuple:
    """argv -> (DecodeOptions, Beam's arguments)."""
    p = argparse.ArgumentParser(prog="latentpack decode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam (--runner, --direct_num_workers, ...).")
    p.add_argument("--input", required=True, help="latent dataset directory (from latentpack encode)")
    p.add_argument("--model-dir", required=True,
                   help="the model artifact that encoded the dataset, or a shipped model: photo:<1-8>")
    p.add_argument("--output", required=True, help="directory for the decoded images")
    p.add_argument("--output-format", default="png", choices=sorted(WRITERS), help="how to write the images")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="fail the job, leaving the output unmarked, if more than this fraction of rows is bad")
    p.add_argument("--allow-damaged", action="store_true",
                   help="decode what is intact: the rows of a part whose checksum fails become `damaged_part` dead "
                        "letters (subject to --max-bad-fraction) instead of failing the job")
    args, beam_args = p.parse_known_args(argv)
    return DecodeOptions(**vars(args)), beam_args


def run(argv=None, test_pipeline=None):
    """Parse argv and run the decode job; returns the output manifest dict."""
    options, beam_args = parse_args(argv)
    return run_job(options, beam_args, test_pipeline)


def run_job(options: DecodeOptions, beam_args=(), test_pipeline=None) -> dict:
    """Build and run the decode job; returns the output manifest dict."""
    from pipeline import models
    model_dir = models.resolve(options.model_dir)
    spec = read_spec(model_dir)
    dataset = options.input.rstrip("/")
    paths, entries = check_dataset(dataset, spec)
    output = options.output.rstrip("/")
    if (output + "/").startswith(dataset + "/"):
        raise LatentpackError(f"--output {output} is, or is inside, the --input dataset {dataset}; decoding there "
                              "would replace the dataset's own manifest and dead letters: choose another folder")
    claim = OutputFolder(output, "decode")
    claim.claim()
    try:
        return _build_and_run(options, beam_args, test_pipeline, spec, model_dir, dataset, paths, entries, output,
                              claim)
    finally:
        claim.release()


def _build_and_run(options, beam_args, test_pipeline, spec, model_dir, dataset, paths, entries, output, claim):
    # PNG files are one per key and are overwritten in place; shard files are replaced.
    clear_previous(output, [f"images-*.{ext}" for ext in ("tfrecord", "npz", "parquet", "npz.tmp")])
    extra = {"job": "decode", "source": dataset, "output_format": options.output_format, "model_fingerprint": spec.fingerprint}
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
    parts = (p
             | "ListParts" >> beam.Create(list(zip(paths, entries)))
             | "SpreadParts" >> beam.Reshuffle()
             | "ReadLatentParquet" >> beam.ParDo(ReadVerifiedParts()).with_outputs(DEAD_LETTER_TAG, main="tables"))
    batches = parts.tables | "DecodeLatents" >> beam.ParDo(DecodeTable(model_dir, spec)).with_outputs(
        DEAD_LETTER_TAG, main="images")
    writer = WRITERS[options.output_format](output)
    written, dead, files = batches.images | f"Write{options.output_format.upper()}" >> writer
    dead = (dead, batches[DEAD_LETTER_TAG], parts[DEAD_LETTER_TAG]) | "AllDeadLetters" >> beam.Flatten()
    reasons, dead_files = dead | "WriteDeadLetters" >> WriteDeadLetters(output, NAMESPACE)
    total = written | "SumWritten" >> beam.CombineGlobally(sum)
    side = beam.pvalue
    (p | "Once" >> beam.Create([None])
       | "WriteManifest" >> beam.ParDo(WriteDecodeManifest(output, extra, options.max_bad_fraction,
                                                         () if options.allow_damaged else ("damaged_part",)),
                                       side.AsSingleton(total), side.AsSingleton(reasons), side.AsList(files),
                                       side.AsList(dead_files)))
    return run_to_completion(p, output, "decoded output", claim)


def main(argv=None) -> int:
    show_progress()
    manifest = run(argv)
    print(summary(manifest, f"decoded {manifest['counts']['written']} images as {manifest['output_format']}"))
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
