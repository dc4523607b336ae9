"""Decode a latent dataset back into images (an Apache Beam batch job).

    latentpack decode --input latents/ --model-dir model/ --output images/ --output-format png

ReadLatentDataset -> DecodeLatents -> Write<format>. Refuses a dataset made with a
different model (fingerprint mismatch) or one that is incomplete (no manifest).
"""
from __future__ import annotations

import argparse
import logging
import posixpath
import sys

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import latents
from pipeline.accounting import (DEFAULT_MAX_BAD_FRACTION, Progress, WriteDeadLetters, clear_previous, counts,
                                 finish, run_to_completion, summary)
from pipeline.artifact import Codec, read_spec
from pipeline.images import ImageBatch, LatentpackError
from pipeline.outputs import WRITERS

NAMESPACE = "latentpack.decode"
BATCH_ROWS = 1024


def check_dataset(dataset_dir: str, spec: dict) -> list:
    """Validate a latent dataset against the model; returns its part paths."""
    manifest = latents.read_manifest(dataset_dir)
    if manifest.get("format") != "latentpack-dataset":
        raise LatentpackError(f"{dataset_dir}: {latents.MANIFEST} is not a latentpack dataset manifest")
    check_fingerprint(posixpath.join(dataset_dir, latents.MANIFEST), manifest.get("model_fingerprint"), spec)
    paths = latents.part_paths(dataset_dir, manifest)
    for path in paths:
        try:
            with FileSystems.open(path) as f:
                schema = pq.read_schema(f)
        except Exception as e:
            raise LatentpackError(f"{path}: not a readable Parquet file ({e})") from None
        try:
            meta = latents.metadata_of(schema)
            fingerprint, latent_format = meta["model_fingerprint"], meta.get("latent_format", "int")
        except (LatentpackError, KeyError, ValueError, TypeError):
            raise LatentpackError(f"{path}: not a latentpack dataset part (no latentpack metadata)") from None
        check_fingerprint(path, fingerprint, spec)
        if latent_format not in latents.LATENT_FORMATS or (latent_format == "code" and "entropy_model" not in spec):
            raise LatentpackError(f"{path}: latent format {latent_format!r} cannot be decoded with this model")
        for field in latents.schema(spec, latent_format):
            if field.name not in schema.names:
                raise LatentpackError(f"{path}: lacks the {field.name!r} column")
            if schema.field(field.name).type != field.type:
                raise LatentpackError(f"{path}: column {field.name!r} is {schema.field(field.name).type}, "
                                      f"the model needs {field.type}")
    return paths


def check_fingerprint(path: str, fingerprint: str, spec: dict) -> None:
    if fingerprint != spec["fingerprint"]:
        raise LatentpackError(
            f"{path} was encoded with model {fingerprint}, but --model-dir {spec['fingerprint']} is "
            "a different model; decode it with the model that encoded it")


class DecodeTable(beam.DoFn):
    """Arrow table of (key, latent, label) -> ImageBatch, with the model loaded once per worker."""

    def __init__(self, model_dir: str, spec: dict):
        self.model_dir, self.spec = model_dir, spec

    def setup(self):
        self.codec = Codec(self.model_dir, self.spec)
        self.images = Metrics.counter(NAMESPACE, "images_decoded")
        self.progress = Progress("decoded")

    def process(self, table):
        # A row group can hold many thousands of rows: decode it in slices of bounded memory.
        for start in range(0, table.num_rows, BATCH_ROWS):
            part = table.slice(start, BATCH_ROWS)
            images = self.codec.decode(latents.table_latents(part, self.codec.entropy))
            label = part.column("label")
            has_label = label.is_valid().to_numpy(zero_copy_only=False)
            labels = label.fill_null(-1).to_numpy()
            self.images.inc(len(images))
            self.progress.add(len(images))
            yield ImageBatch(part.column("key").to_pylist(), images, labels.astype(np.int64), has_label)


class WriteDecodeManifest(beam.DoFn):
    def __init__(self, output: str, extra: dict, max_bad_fraction: float):
        self.output, self.extra, self.max_bad_fraction = output, extra, max_bad_fraction

    def process(self, _, written, reasons, files, dead_letter_files):
        payload = dict(self.extra, format="latentpack-decoded", complete=True, images=written,
                       counts=counts(written, reasons),
                       files=sorted(posixpath.relpath(p, self.output) for p in files),
                       dead_letter_files=sorted(posixpath.relpath(p, self.output) for p in dead_letter_files))
        finish(self.output, payload, self.max_bad_fraction)
        yield payload


def parse_args(argv):
    p = argparse.ArgumentParser(prog="latentpack decode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam (--runner, --direct_num_workers, ...).")
    p.add_argument("--input", required=True, help="latent dataset directory (from latentpack encode)")
    p.add_argument("--model-dir", required=True, help="the model artifact that encoded the dataset")
    p.add_argument("--output", required=True, help="directory for the decoded images")
    p.add_argument("--output-format", default="png", choices=sorted(WRITERS), help="how to write the images")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="fail the job, leaving the output unmarked, if more than this fraction of rows is bad")
    return p.parse_known_args(argv)


def run(argv=None, test_pipeline=None):
    """Build and run the decode job; returns the output manifest dict."""
    args, beam_args = parse_args(argv)
    spec = read_spec(args.model_dir)
    dataset = args.input.rstrip("/")
    paths = check_dataset(dataset, spec)
    output = args.output.rstrip("/")
    # PNG files are one per key and are overwritten in place; shard files are replaced.
    clear_previous(output, [f"images-*.{ext}" for ext in ("tfrecord", "npz", "parquet", "npz.tmp")])
    extra = {"source": dataset, "output_format": args.output_format, "model_fingerprint": spec["fingerprint"]}
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    batches = (p
               | "ListParts" >> beam.Create(paths)
               | "SpreadParts" >> beam.Reshuffle()
               | "ReadLatentParquet" >> beam.io.ReadAllFromParquetBatched()
               | "DecodeLatents" >> beam.ParDo(DecodeTable(args.model_dir, spec)))
    written, dead, files = batches | f"Write{args.output_format.upper()}" >> WRITERS[args.output_format](output)
    reasons, dead_files = dead | "WriteDeadLetters" >> WriteDeadLetters(output, NAMESPACE)
    total = written | "SumWritten" >> beam.CombineGlobally(sum)
    side = beam.pvalue
    (p | "Once" >> beam.Create([None])
       | "WriteManifest" >> beam.ParDo(WriteDecodeManifest(output, extra, args.max_bad_fraction), side.AsSingleton(total),
                                       side.AsSingleton(reasons), side.AsList(files), side.AsList(dead_files)))
    return run_to_completion(p, output)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = run(argv)
    print(summary(manifest, f"decoded {manifest['counts']['written']} images as {manifest['output_format']}"))
    return 0


if __name__ == "__main__":
    from pipeline.cli import guarded
    sys.exit(guarded(main)())
