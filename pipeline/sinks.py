"""Where the encode job's tables go: one latent dataset, or one part per input shard.

Both sinks take `(tables, dead_letters)` — tables as `(shard, Arrow table)` pairs from
EncodeImages — and end by writing `_manifest.json` (or `_failed.json`) once every part
is final, so the encode job has one read and encode path whichever sink it uses.

- `WriteLatentDataset`: parts sized by the runner (`--num-shards` to fix their number),
  dead letters in `dead_letter/part-*.jsonl`.
- `WritePartPerShard` (`--skip-existing`): `latents-<shard>-<hash>.parquet` per input
  shard, written under a temporary name and renamed when complete, with the shard's counts
  in the file's metadata and its dead letters in `dead_letter/<part>.jsonl`; shards whose
  part exists for the same model and latent format are not read again, and the manifest
  covers every part in the folder. A nightly job over a growing set of shards encodes
  only the new ones.
"""
from __future__ import annotations

import json
import posixpath
import re
import zlib

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import latents
from pipeline.accounting import CountDeadLetters, WriteDeadLetters, counts, finish
from pipeline.completion import DEAD_LETTER_DIR, FAILED, clear_previous, write_json
from pipeline.errors import log

NAMESPACE = "latentpack.encode"
COUNTS_KEY = b"latentpack_counts"


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
    """(shard, table) pairs + dead letters -> Parquet parts, dead-letter JSONL, then `_manifest.json` last."""

    def __init__(self, output: str, spec, latent_format: str, extra: dict, num_shards: int = 0,
                 max_bad_fraction: float = 0.01, fatal_reasons=()):
        super().__init__()
        self.output, self.spec, self.extra, self.num_shards = output, spec, extra, num_shards
        self.latent_format, self.max_bad_fraction, self.fatal_reasons = latent_format, max_bad_fraction, fatal_reasons

    def prepare(self, shards):
        """In the driver, before the job: remove what an earlier run of this job wrote."""
        clear_previous(self.output, [f"{latents.PART_PREFIX}-*.parquet", f"{DEAD_LETTER_DIR}/*.jsonl"])
        return shards

    def expand(self, inputs):
        keyed, dead_letters = inputs
        tables = keyed | "Tables" >> beam.Values()
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
                    WriteManifest(self.output, self.spec.fingerprint, self.extra, self.max_bad_fraction,
                                  self.fatal_reasons),
                    side.AsList(parts), side.AsSingleton(rows), side.AsSingleton(reasons), side.AsList(dead_files)))


def part_name(shard: str) -> str:
    """A stable, filesystem-safe part name for an input shard."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(shard))[:80]
    return f"{latents.PART_PREFIX}-{base}-{zlib.crc32(shard.encode('utf-8', 'surrogatepass')):08x}.parquet"


def part_state(path: str):
    """(fingerprint, latent_format, counts) of an existing part, or None if it is unreadable."""
    try:
        with FileSystems.open(path) as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        info = json.loads(meta[latents.METADATA_KEY])
        return info["model_fingerprint"], info.get("latent_format", "int"), json.loads(meta[COUNTS_KEY])
    except Exception:
        return None


class WriteShardPart(beam.DoFn):
    """(shard, {tables, dead, shard}) -> that shard's complete part; yields the part's path."""

    def __init__(self, output: str, spec, latent_format: str):
        self.output, self.spec, self.latent_format = output, spec, latent_format

    def process(self, grouped):
        shard, values = grouped
        schema = latents.schema(self.spec, self.latent_format)
        tables = [t for t in values["tables"]]
        letters = sorted(values["dead"], key=lambda d: d.index)
        name = part_name(shard)
        path = posixpath.join(self.output, name)
        reasons = {}
        for letter in letters:
            reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
        table = (pa.concat_tables(tables).sort_by("key") if tables else schema.empty_table())
        tmp = path + ".tmp"
        with FileSystems.create(tmp) as handle:
            writer = pq.ParquetWriter(handle, schema, **latents.writer_options(schema, self.latent_format))
            writer.write_table(table, row_group_size=latents.ROW_GROUP_ROWS)
            writer.add_key_value_metadata({COUNTS_KEY: json.dumps(counts(table.num_rows, reasons)),
                                           b"latentpack_source": shard})
            writer.close()
        # Dead letters first: a part that exists always has its dead letters beside it.
        letters_path = posixpath.join(self.output, DEAD_LETTER_DIR, name[:-len(".parquet")] + ".jsonl")
        with FileSystems.create(letters_path + ".tmp") as f:
            f.write("".join(json.dumps(d.to_dict(), sort_keys=True) + "\n" for d in letters).encode())
        FileSystems.rename([letters_path + ".tmp"], [letters_path])
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])
        yield path


class WriteFolderManifest(beam.DoFn):
    """After every shard is done: a manifest over all parts in the folder, old and new."""

    def __init__(self, output: str, spec, latent_format: str, extra: dict, max_bad_fraction: float,
                 fatal_reasons=()):
        self.output, self.spec, self.latent_format = output, spec, latent_format
        self.extra, self.max_bad_fraction, self.fatal_reasons = extra, max_bad_fraction, tuple(fatal_reasons)

    def process(self, _, done_parts):
        found = FileSystems.match([posixpath.join(self.output, f"{latents.PART_PREFIX}-*.parquet")])[0].metadata_list
        paths = sorted(m.path for m in found)
        total = {"read": 0, "written": 0, "dead_lettered": 0, "dead_lettered_by_reason": {}}
        for path in paths:
            state = part_state(path)
            if state is None or state[:2] != (self.spec.fingerprint, self.latent_format):
                failure = (f"{path} was not written by an incremental (--skip-existing) run with this model and "
                           "latent format; move it away, or encode without --skip-existing")
                write_json(posixpath.join(self.output, FAILED), {"complete": False, "failure": failure})
                return
            part_counts = state[2]
            for k in ("read", "written", "dead_lettered"):
                total[k] += part_counts[k]
            for reason, n in part_counts["dead_lettered_by_reason"].items():
                total["dead_lettered_by_reason"][reason] = total["dead_lettered_by_reason"].get(reason, 0) + n
        payload = latents.manifest(latents.describe_parts(paths), total, self.spec.fingerprint,
                                   dict(self.extra, incremental=True, parts_this_run=len(done_parts)))
        payload["dead_letter_files"] = sorted(
            posixpath.relpath(m.path, self.output) for m in FileSystems.match(
                [posixpath.join(self.output, DEAD_LETTER_DIR, "*.jsonl")])[0].metadata_list)
        finish(self.output, payload, self.max_bad_fraction, self.fatal_reasons)
        yield payload


class WritePartPerShard(beam.PTransform):
    """The `--skip-existing` sink: one part per shard read this run, then a manifest over the folder."""

    def __init__(self, output: str, spec, latent_format: str, extra: dict, max_bad_fraction: float = 0.01,
                 fatal_reasons=()):
        super().__init__()
        self.output, self.spec, self.latent_format, self.extra = output, spec, latent_format, extra
        self.max_bad_fraction, self.fatal_reasons = max_bad_fraction, fatal_reasons
        self.shards, self.existing = [], []

    def prepare(self, shards):
        """In the driver: drop unfinished temporary files, and return the shards that still need a part."""
        clear_previous(self.output, [f"{latents.PART_PREFIX}-*.parquet.tmp", f"{DEAD_LETTER_DIR}/*.jsonl.tmp"])
        todo = []
        for shard in shards:
            path = posixpath.join(self.output, part_name(shard))
            state = part_state(path) if FileSystems.exists(path) else None
            if not (state and state[:2] == (self.spec.fingerprint, self.latent_format)):
                todo.append(shard)
        log.info("%d of %d shard(s) already have a part; encoding %d", len(shards) - len(todo), len(shards),
                 len(todo))
        self.shards = todo
        rewritten = {posixpath.join(self.output, part_name(s)) for s in todo}
        # Every part that stays (for these shards or others): its keys come before any new one.
        self.existing = sorted(m.path for m in FileSystems.match(
            [posixpath.join(self.output, f"{latents.PART_PREFIX}-*.parquet")])[0].metadata_list
            if m.path not in rewritten)
        return todo

    def expand(self, inputs):
        keyed, dead_letters = inputs
        p = keyed.pipeline
        dead = (dead_letters
                | "CountByReason" >> beam.ParDo(CountDeadLetters(NAMESPACE))
                | "ByShard" >> beam.Map(lambda d: (d.source, d)))
        every_shard = p | "ShardsToWrite" >> beam.Create([(s, None) for s in self.shards])
        parts = ({"tables": keyed, "dead": dead, "shard": every_shard}
                 | "GroupByShard" >> beam.CoGroupByKey()
                 | "WriteShardParts" >> beam.ParDo(WriteShardPart(self.output, self.spec, self.latent_format)))
        return (p
                | "Once" >> beam.Create([None])
                | "WriteManifest" >> beam.ParDo(
                    WriteFolderManifest(self.output, self.spec, self.latent_format, self.extra,
                                        self.max_bad_fraction, self.fatal_reasons),
                    beam.pvalue.AsList(parts)))
