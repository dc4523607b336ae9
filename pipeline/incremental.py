"""Incremental encoding (`latentpack encode --skip-existing`): one output part per input shard.

Each shard becomes `latents-<shard name>-<hash of its path>.parquet`, written under a
temporary name and renamed when complete, with the shard's own counts in the file's
key-value metadata and its dead letters in `dead_letter/<part>.jsonl`. A shard whose part
already exists for the same model and latent format is skipped, so a nightly job encodes
only new shards; the manifest is then rebuilt from every part in the folder.
"""
from __future__ import annotations

import json
import posixpath
import re
import zlib

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import latents
from pipeline.accounting import FAILED, Progress, counts, finish
from pipeline.artifact import Codec
from pipeline.formats import get_reader
from pipeline.images import DeadLetter, batch_records

COUNTS_KEY = b"latentpack_counts"


def part_name(shard: str) -> str:
    """A stable, filesystem-safe part name for an input shard."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(shard))[:80]
    return f"{latents.PART_PREFIX}-{base}-{zlib.crc32(shard.encode()):08x}.parquet"


def part_state(path: str):
    """(fingerprint, latent_format, counts) of an existing part, or None if it is unreadable."""
    try:
        with FileSystems.open(path) as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        info = json.loads(meta[latents.METADATA_KEY])
        return info["model_fingerprint"], info.get("latent_format", "int"), json.loads(meta[COUNTS_KEY])
    except Exception:
        return None


class EncodeShardToPart(beam.DoFn):
    """shard -> its own complete Parquet part (or nothing to do); yields the part's path."""

    def __init__(self, input_format, root, model_dir, spec, latent_format, output, batch_size, max_pixels):
        self.input_format, self.root, self.model_dir, self.spec = input_format, root, model_dir, spec
        self.latent_format, self.output = latent_format, output
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def setup(self):
        self.codec = Codec(self.model_dir, self.spec)
        self.schema = latents.schema(self.spec, self.latent_format)
        self.skipped = Metrics.counter("latentpack.encode", "shards_skipped")
        self.progress = Progress("encoded")

    def process(self, shard: str):
        path = posixpath.join(self.output, part_name(shard))
        state = part_state(path) if FileSystems.exists(path) else None
        if state and state[:2] == (self.spec["fingerprint"], self.latent_format):
            self.skipped.inc()
            yield path
            return
        tmp = path + ".tmp"
        letters, written = [], 0
        handle = FileSystems.create(tmp)
        writer = pq.ParquetWriter(handle, self.schema, **latents.writer_options(self.latent_format))
        records = get_reader(self.input_format).records(shard, self.root)
        for item in batch_records(records, tuple(self.spec["image_shape"]), self.batch_size, self.max_pixels):
            if isinstance(item, DeadLetter):
                letters.append(item)
                continue
            values = latents.value_array(self.codec.encode(item.images), self.latent_format, self.codec.entropy)
            writer.write_table(latents.to_table(item.keys, values, item.labels, item.has_label, self.schema))
            written += len(item)
            self.progress.add(len(item))
        reasons = {}
        for letter in letters:
            reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
        writer.add_key_value_metadata({COUNTS_KEY: json.dumps(counts(written, reasons)), b"latentpack_source": shard})
        writer.close()
        handle.close()
        # Dead letters first: a part that exists always has its dead letters beside it.
        letters_path = posixpath.join(self.output, latents.DEAD_LETTER_DIR, part_name(shard)[:-8] + ".jsonl")
        with FileSystems.create(letters_path + ".tmp") as f:
            f.write("".join(json.dumps(d.to_dict(), sort_keys=True) + "\n" for d in letters).encode())
        FileSystems.rename([letters_path + ".tmp"], [letters_path])
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])
        yield path


class WriteIncrementalManifest(beam.DoFn):
    """After every shard is done: a manifest over all parts in the folder, old and new."""

    def __init__(self, output: str, spec: dict, latent_format: str, extra: dict, max_bad_fraction: float):
        self.output, self.spec, self.latent_format = output, spec, latent_format
        self.extra, self.max_bad_fraction = extra, max_bad_fraction

    def process(self, _, done_parts):
        found = FileSystems.match([posixpath.join(self.output, f"{latents.PART_PREFIX}-*.parquet")])[0].metadata_list
        paths = sorted(m.path for m in found)
        total = {"read": 0, "written": 0, "dead_lettered": 0, "dead_lettered_by_reason": {}}
        for path in paths:
            state = part_state(path)
            if state is None or state[:2] != (self.spec["fingerprint"], self.latent_format):
                failure = (f"{path} was not written by an incremental (--skip-existing) run with this model and "
                           "latent format; move it away, or encode without --skip-existing")
                latents.write_json(posixpath.join(self.output, FAILED), {"complete": False, "failure": failure})
                return
            part_counts = state[2]
            for k in ("read", "written", "dead_lettered"):
                total[k] += part_counts[k]
            for reason, n in part_counts["dead_lettered_by_reason"].items():
                total["dead_lettered_by_reason"][reason] = total["dead_lettered_by_reason"].get(reason, 0) + n
        payload = latents.manifest(latents.describe_parts(paths), total, self.spec["fingerprint"],
                                   dict(self.extra, incremental=True, parts_this_run=len(done_parts)))
        payload["dead_letter_files"] = sorted(
            posixpath.relpath(m.path, self.output) for m in FileSystems.match(
                [posixpath.join(self.output, latents.DEAD_LETTER_DIR, "*.jsonl")])[0].metadata_list)
        finish(self.output, payload, self.max_bad_fraction)
        yield payload


def build(p, shards, args, spec, latent_format, root, output, extra):
    """The --skip-existing encode pipeline: shards -> parts -> manifest."""
    parts = (p
             | "ListShards" >> beam.Create(shards)
             | "SpreadShards" >> beam.Reshuffle()
             | "EncodeShardsToParts" >> beam.ParDo(EncodeShardToPart(
                 args.input_format, root, args.model_dir, spec, latent_format, output, args.batch_size,
                 args.max_pixels)))
    return (p
            | "Once" >> beam.Create([None])
            | "WriteManifest" >> beam.ParDo(
                WriteIncrementalManifest(output, spec, latent_format, extra, args.max_bad_fraction),
                beam.pvalue.AsList(parts)))
