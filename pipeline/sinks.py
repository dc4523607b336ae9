"""Where the encode job's encoded rows go: Parquet parts, their dead letters, then the manifest.

The encode job tags every table of encoded rows and every dead letter with the part it
belongs to (a part holds the rows of one or more whole input shards, fixed in the driver
before the job starts). A sink groups them by part, writes each part whole (temporary name,
then a rename) with its dead letters beside it in `dead_letter/<part>.jsonl`, and ends with
`_manifest.json` (or `_failed.json`) once every planned part has been written. The graph is
GroupByKey and single-output ParDos only, so it runs the same on every Beam runner.

- `WriteLatentDataset`: parts `latents-JJJJJ-of-NNNNN.parquet`, one per input shard for
  container formats (TFRecord, Parquet, tar, ...), of at least 256 files and 16 MiB of input
  for image folders (`plan_parts`), or `--num-shards` of them.
- `WriteNewShards` (`--skip-existing`): parts for the input shards that no part in the folder
  holds yet (for the same model and latent format), planned like the above among those shards
  and named after them (`latents-<first shard>-<hash>.parquet`); each part's footer names its
  shards exactly, so the next run knows what is done; the manifest covers every part in the
  folder. A nightly job over a growing set of shards encodes only the new ones.
"""
from __future__ import annotations

import base64
import bisect
import dataclasses
import json
import posixpath
import re
import zlib
from typing import Optional

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import latents
from pipeline.codec import schema_of
from pipeline.accounting import (Gather, add_reasons, count_dead_letter, count_reasons, counts, failure_of, finish,
                                 reported, write_dead_letters)
from pipeline.completion import DEAD_LETTER_DIR, FAILED, clear_previous, seal, stored_json, write_json
from pipeline.errors import LatentpackError, log
from pipeline.images import DeadLetter

NAMESPACE = "latentpack.encode"
COUNTS_KEY = b"latentpack_counts"
SOURCES_KEY = b"latentpack_source_range"
FILES_KEY = b"latentpack_sources_zlib"  # the exact list (incremental parts; every part before the range)
OLD_FILES_KEY = b"latentpack_sources"  # the oldest parts: a plain JSON list
STAMPS_KEY = b"latentpack_sources_stamp"  # a digest of the part's input shards' names, sizes and times


def stamp(shards, stamps: dict) -> str:
    """A digest of a run of input shards as they are now: each one's name, size and modification
    time (`Reader.stamps`; a file that is gone counts as such). A part records it, so that a later
    `--skip-existing` run sees when a shard it holds was changed, replaced or removed, without
    reading every input again; 16 bytes of SHA-256 in hex."""
    import hashlib

    h = hashlib.sha256()
    for shard in sorted(shards):
        h.update(json.dumps([shard, stamps.get(shard)]).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()[:32]


def sources_metadata(shards) -> bytes:
    """The input shards of a part: a part holds a run of consecutive shards of the job's sorted
    list, so the first, the last and how many (JSON) describe them in a few hundred bytes
    whatever their number. Listing them cost about 5 bytes per image for a folder of thumbnails
    (one file per shard); each file's name is in its row's key or its dead letter anyway."""
    return json.dumps(_run(shards)).encode()


def _run(shards) -> dict:
    shards = sorted(shards)
    return {"first": shards[0] if shards else None, "last": shards[-1] if shards else None, "shards": len(shards)}


def sources_entry(shards, exact: bool) -> dict:
    """A part's footer entry for its input shards: the run (`sources_metadata`), or with `exact`
    (an incremental part of several shards, which the next run must match file by file) the list
    itself, zlib-compressed."""
    shards = sorted(shards)
    if exact and len(shards) > 1:
        return {FILES_KEY: base64.b64encode(zlib.compress(json.dumps(shards).encode(), 9))}
    return {SOURCES_KEY: sources_metadata(shards)}


def read_sources(metadata: dict) -> dict:
    """The input shards a part was written from (its Parquet key-value metadata): {"first",
    "last", "shards"} (the run of the job's sorted input shards from first to last), and "files"
    (the full list) for parts that list them (incremental parts of several shards, and parts
    written before the run format)."""
    if SOURCES_KEY in metadata:
        return json.loads(metadata[SOURCES_KEY])
    if FILES_KEY in metadata:
        files = json.loads(zlib.decompress(base64.b64decode(metadata[FILES_KEY])))
    elif OLD_FILES_KEY in metadata:
        files = json.loads(metadata[OLD_FILES_KEY])
    else:
        raise KeyError("the part records no input shards")
    return dict(_run(files), files=sorted(files))


@dataclasses.dataclass(frozen=True)
class ShardDone:
    """Sent to a shard's part after its last row: a part is written only when all its shards are in."""

    shard: str


class WritePart(beam.DoFn):
    """(part name, [tables, dead letters, ShardDone]) -> the part and its dead letters, written
    whole; yields a summary {part, dead_letters, rows, reasons}."""

    def __init__(self, output: str, spec, latent_format: str, shards_per_part: dict, exact_sources: bool = False,
                 part_stamps: Optional[dict] = None, extra_fields=()):
        self.output, self.spec, self.latent_format = output, spec, latent_format
        self.shards_per_part, self.exact_sources = dict(shards_per_part), exact_sources
        self.part_stamps = dict(part_stamps or {})
        self.extra_fields = list(extra_fields)  # the source's other columns, kept beside the codes

    def process(self, element):
        name, items = element
        tables, letters, done = [], [], set()
        for item in items:
            if isinstance(item, ShardDone):
                done.add(item.shard)
            elif isinstance(item, DeadLetter):
                letters.append(item)
            else:
                tables.append(item)
        expected = self.shards_per_part[name]
        if len(done) != expected:  # never write a part that lacks a shard's rows
            raise RuntimeError(f"{name}: {len(done)} of its {expected} input shard(s) arrived")
        letters.sort(key=lambda d: (d.source, d.index, d.key))
        for letter in letters:
            count_dead_letter(NAMESPACE, letter)
        reasons = count_reasons(letters)
        rows = sum(t.num_rows for t in tables)
        pixels = sum(_pixels(t, self.spec) for t in tables)
        path = posixpath.join(self.output, name)
        # Dead letters first: a part that exists always has its dead letters beside it.
        letters_path = posixpath.join(self.output, DEAD_LETTER_DIR, name[:-len(".parquet")] + ".jsonl")
        write_dead_letters(letters_path, letters)
        # The source's other columns that hold anything here; a part stores only those (a TFRecord
        # input with nothing besides image, key and label adds no column at all).
        stored = latents.metadata_of(schema_of(self.spec, self.latent_format, self.extra_fields)).get(
            "extra_columns", [])  # [{name: as the tables hold it, source: the input's name}]
        held = [e["source"] for e in stored if any(t.column(e["name"]).null_count < t.num_rows for t in tables)]
        schema = schema_of(self.spec, self.latent_format, self.extra_fields, held)
        tables = [t.select(schema.names).replace_schema_metadata(schema.metadata) for t in tables]
        latents.write_part(path, tables, schema, self.latent_format,
                           {COUNTS_KEY: json.dumps(counts(rows, reasons)),
                            **sources_entry(done, self.exact_sources),
                            **({STAMPS_KEY: self.part_stamps[name]} if name in self.part_stamps else {})})
        yield {"part": path, "dead_letters": letters_path, "rows": rows, "reasons": reasons, "pixels": pixels,
               "extra_columns": held}


def _pixels(table, spec) -> int:
    """Pixels of a table's images: its height and width columns (photo families), else the
    model's one image size."""
    import numpy as np

    if "height" in table.column_names and "width" in table.column_names:
        h = table.column("height").to_numpy().astype(np.int64)
        w = table.column("width").to_numpy().astype(np.int64)
        return int((h * w).sum())
    from pipeline.codec import codec_class

    shape = codec_class(spec).image_shape(spec)
    return table.num_rows * shape[0] * shape[1] if shape else 0


class _LatentSink(beam.PTransform):
    """(part name, item) pairs -> parts -> the manifest. Subclasses plan the parts in the driver
    (`prepare`, then `part_of`) and write the manifest (`manifest_fn`)."""

    def __init__(self, output: str, spec, latent_format: str, extra: dict, max_bad_fraction: float = 0.01,
                 fatal_reasons=()):
        super().__init__()
        self.output, self.spec, self.latent_format, self.extra = output, spec, latent_format, extra
        self.max_bad_fraction, self.fatal_reasons = max_bad_fraction, tuple(fatal_reasons)
        self.part_of = {}  # shard -> part name, for the shards this run reads
        self.existing = []  # parts already in the folder whose keys come first (--skip-existing)
        self.stamps = {}  # shard -> [size, modification time] as the input's listing gave them

    def part_stamps(self) -> dict:
        runs = {}
        for shard, part in self.part_of.items():
            runs.setdefault(part, []).append(shard)
        return {part: stamp(run, self.stamps) for part, run in runs.items()}

    def planned_paths(self) -> set:
        return {posixpath.join(self.output, part) for part in self.part_of.values()}

    def shards_per_part(self) -> dict:
        out = {}
        for part in self.part_of.values():
            out[part] = out.get(part, 0) + 1
        return out

    def manifest_fn(self) -> beam.DoFn:
        raise NotImplementedError

    exact_sources = False  # footers list their shards (rather than first, last, count)
    extra_fields: tuple = ()  # the source's other columns (`Reader.extra_fields`), kept in every part

    def expand(self, items):
        return (items
                | "GroupByPart" >> beam.GroupByKey()
                | "WriteParts" >> beam.ParDo(WritePart(self.output, self.spec, self.latent_format,
                                                       self.shards_per_part(), self.exact_sources,
                                                       self.part_stamps(), self.extra_fields))
                | "GatherSummaries" >> Gather()
                | "WriteManifest" >> beam.ParDo(self.manifest_fn()))


class WriteManifest(beam.DoFn):
    """Runs once, after every part is written: check that each planned part is there, describe
    the parts and write _manifest.json."""

    def __init__(self, output: str, parts, fingerprint: str, extra: dict, max_bad_fraction: float,
                 fatal_reasons=()):
        self.output, self.parts, self.fingerprint, self.extra = output, sorted(parts), fingerprint, extra
        self.max_bad_fraction, self.fatal_reasons = max_bad_fraction, tuple(fatal_reasons)

    def process(self, summaries):
        by_part = reported(summaries, self.parts, "written")
        reasons = {}
        for s in by_part.values():
            add_reasons(reasons, s["reasons"])
        rows = sum(s["rows"] for s in by_part.values())
        described = latents.describe_parts([s["part"] for s in by_part.values()])
        payload = latents.manifest(described, counts(rows, reasons), self.fingerprint,
                                   with_extra_columns(dict(self.extra, pixels=sum(s.get("pixels", 0)
                                                                                  for s in by_part.values())),
                                                      by_part.values()))
        payload["dead_letter_files"] = sorted(posixpath.relpath(s["dead_letters"], self.output)
                                              for s in by_part.values())
        finish(self.output, payload, self.max_bad_fraction, self.fatal_reasons)
        yield payload


def with_extra_columns(extra: dict, summaries, earlier=()) -> dict:
    """The manifest's `extra_columns`: the source's other columns that some part holds values of
    (in the input's order; `earlier`: those an earlier run's parts hold), or none at all."""
    held = set(earlier).union(*[s.get("extra_columns", []) for s in summaries])
    names = [n for n in extra.get("extra_columns", []) if n in held] + sorted(set(earlier) - set(extra.get(
        "extra_columns", [])))
    out = {k: v for k, v in extra.items() if k != "extra_columns"}
    if names:
        out["extra_columns"] = names
    return out


def plan_parts(shards, sizes: dict, min_files: int = 1, min_bytes: int = 0, num_parts: int = 0) -> list:
    """The part index of each shard (in order): `num_parts` parts of equal shard counts, or else
    consecutive shards until a part holds at least `min_files` of them and `min_bytes` of input
    (a shard of unknown size counts as 0 bytes); a short remainder joins the last part."""
    if num_parts:
        n = min(num_parts, len(shards))
        return [i * n // len(shards) for i in range(len(shards))]
    index, part, files, size = [], 0, 0, 0
    for shard in shards:
        if files >= min_files and size >= min_bytes:
            part, files, size = part + 1, 0, 0
        index.append(part)
        files, size = files + 1, size + (sizes.get(shard) or 0)
    if part and (files < min_files or size < min_bytes):  # the remainder is not a part's worth
        index = [min(i, part - 1) for i in index]
    return index


class WriteLatentDataset(_LatentSink):
    """Parts of whole input shards (`--num-shards` of them, or planned by `plan_parts`)."""

    def __init__(self, output: str, spec, latent_format: str, extra: dict, num_shards: int = 0,
                 max_bad_fraction: float = 0.01, fatal_reasons=(), part_files: int = 1, part_bytes: int = 0,
                 sizes: Optional[dict] = None):
        super().__init__(output, spec, latent_format, extra, max_bad_fraction, fatal_reasons)
        self.num_shards, self.part_files, self.part_bytes = num_shards, part_files, part_bytes
        self.sizes = dict(sizes or {})

    def prepare(self, shards):
        """In the driver, before the job: remove what an earlier run of this job wrote; plan the parts."""
        clear_previous(self.output, [f"{latents.PART_PREFIX}-*.parquet", f"{latents.PART_PREFIX}-*.parquet.tmp",
                                     f"{DEAD_LETTER_DIR}/*.jsonl", f"{DEAD_LETTER_DIR}/*.jsonl.tmp"])
        if self.num_shards > len(shards):
            log.info("--num-shards %d: a part holds whole input shards, so %d part(s)", self.num_shards, len(shards))
        index = plan_parts(shards, self.sizes, self.part_files, self.part_bytes, self.num_shards)
        n = index[-1] + 1 if index else 0
        self.part_of = {shard: f"{latents.PART_PREFIX}-{i:05d}-of-{n:05d}.parquet" for shard, i in zip(shards, index)}
        return shards

    def manifest_fn(self):
        return WriteManifest(self.output, self.planned_paths(), self.spec.fingerprint, self.extra,
                             self.max_bad_fraction, self.fatal_reasons)


def part_name(shards) -> str:
    """A stable, filesystem-safe part name for a run of input shards (one, or several)."""
    shards = sorted(shards)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(shards[0]))[:80]
    more = f"-{len(shards)}-shards" if len(shards) > 1 else ""
    crc = zlib.crc32("\n".join(shards).encode("utf-8", "surrogatepass"))
    return f"{latents.PART_PREFIX}-{base}{more}-{crc:08x}.parquet"


@dataclasses.dataclass
class PartState:
    """What an existing part's footer says: the model and latent format it was written with, its
    counts, and its input shards (`read_sources`; None where it records none)."""

    fingerprint: str
    latent_format: str
    counts: dict
    sources: Optional[dict]
    stamp: Optional[str] = None  # `stamp` of its input shards when written (parts since 0.7)


def part_state(path: str) -> Optional[PartState]:
    """The footer of an existing part, or None if it is unreadable."""
    try:
        with FileSystems.open(path) as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        info = json.loads(meta[latents.METADATA_KEY])
        try:
            sources = read_sources(meta)
        except (KeyError, ValueError, TypeError, zlib.error):
            sources = None
        if not _well_formed(sources):  # a damaged footer: the part is known by its name alone
            sources = None
        stamped = meta.get(STAMPS_KEY)
        return PartState(info["model_fingerprint"], info.get("latent_format", "int"), json.loads(meta[COUNTS_KEY]),
                         sources, stamped.decode() if isinstance(stamped, bytes) else None)
    except Exception:
        return None


def _well_formed(sources) -> bool:
    if not isinstance(sources, dict):
        return False
    if "files" in sources:
        return isinstance(sources["files"], list) and all(isinstance(f, str) for f in sources["files"])
    return (isinstance(sources.get("shards"), int) and (sources["shards"] == 0 or (
        isinstance(sources.get("first"), str) and isinstance(sources.get("last"), str))))


class WriteFolderManifest(beam.DoFn):
    """After every shard is done: a manifest over all parts in the folder, old and new."""

    def __init__(self, output: str, spec, latent_format: str, extra: dict, max_bad_fraction: float,
                 fatal_reasons=(), planned=()):
        self.output, self.spec, self.latent_format = output, spec, latent_format
        self.extra, self.max_bad_fraction, self.fatal_reasons = extra, max_bad_fraction, tuple(fatal_reasons)
        self.planned = sorted(planned)

    def process(self, summaries):
        done = reported(summaries, self.planned, "written")
        # This run is judged on its own inputs: a bad file tonight is measured against tonight's
        # files, not every input the folder ever held. A run that fails removes its new parts and
        # leaves the manifest of the last successful run (and so the dataset) as it was.
        reasons = {}
        for s in done.values():
            add_reasons(reasons, s["reasons"])
        this_run = counts(sum(s["rows"] for s in done.values()), reasons)
        failure = failure_of(this_run, self.max_bad_fraction, self.fatal_reasons)
        if failure:
            self.fail(done, f"this run: {failure}", this_run)
            return
        found = FileSystems.match([posixpath.join(self.output, f"{latents.PART_PREFIX}-*.parquet")])[0].metadata_list
        paths = sorted(m.path for m in found)
        total = {"read": 0, "written": 0, "dead_lettered": 0, "dead_lettered_by_reason": {}}
        for path in paths:
            state = part_state(path)
            if state is None or (state.fingerprint, state.latent_format) != (self.spec.fingerprint, self.latent_format):
                self.fail(done, f"{path} was not written by an incremental (--skip-existing) run with this model "
                                "and latent format; move it away, or encode without --skip-existing", this_run)
                return
            part_counts = state.counts
            for k in ("read", "written", "dead_lettered"):
                total[k] += part_counts[k]
            add_reasons(total["dead_lettered_by_reason"], part_counts["dead_lettered_by_reason"])
        earlier = stored_json(posixpath.join(self.output, latents.MANIFEST)) or {}
        payload = latents.manifest(latents.describe_parts(paths), total, self.spec.fingerprint,
                                   with_extra_columns(dict(self.extra, incremental=True, parts_this_run=len(done),
                                                           this_run=this_run), done.values(),
                                                      earlier.get("extra_columns", [])))
        payload["dead_letter_files"] = sorted(
            posixpath.relpath(m.path, self.output) for m in FileSystems.match(
                [posixpath.join(self.output, DEAD_LETTER_DIR, "*.jsonl")])[0].metadata_list)
        write_json(posixpath.join(self.output, latents.MANIFEST), seal(payload))
        yield payload


    def fail(self, done: dict, failure: str, this_run: dict) -> None:
        """A run that fails removes the parts it added and keeps the manifest of the last successful
        run (unless it rewrote a part that manifest sealed: then the manifest goes too), and
        writes `_failed.json` with this run's counts, reason and dead letters."""
        sealed = stored_json(posixpath.join(self.output, latents.MANIFEST))
        listed = {f.get("name") for f in (sealed or {}).get("files", []) if isinstance(f, dict)}
        replaced = [p for p in done if posixpath.basename(p) in listed]
        new = sorted(p for p in done if posixpath.basename(p) not in listed)
        if new:
            FileSystems.delete(new)
        if sealed is not None and replaced:  # a part it sealed was rewritten: it no longer describes the folder
            FileSystems.delete([posixpath.join(self.output, latents.MANIFEST)])
        write_json(posixpath.join(self.output, FAILED), dict(
            self.extra, complete=False, failure=failure, counts=this_run,
            kept_manifest=sealed is not None and not replaced, removed_parts=[posixpath.basename(p) for p in new],
            dead_letter_files=sorted(posixpath.relpath(s["dead_letters"], self.output) for s in done.values())))


class WriteNewShards(_LatentSink):
    """The `--skip-existing` sink: parts for the shards no part in the folder holds yet (planned
    among them as `WriteLatentDataset` does), then a manifest over the folder."""

    exact_sources = True

    def __init__(self, output: str, spec, latent_format: str, extra: dict, max_bad_fraction: float = 0.01,
                 fatal_reasons=(), part_files: int = 1, part_bytes: int = 0, sizes: Optional[dict] = None):
        super().__init__(output, spec, latent_format, extra, max_bad_fraction, fatal_reasons)
        self.part_files, self.part_bytes, self.sizes = part_files, part_bytes, dict(sizes or {})

    def prepare(self, shards):
        """In the driver: drop unfinished temporary files, and return the shards that still need a part."""
        clear_previous(self.output, [f"{latents.PART_PREFIX}-*.parquet.tmp", f"{DEAD_LETTER_DIR}/*.jsonl.tmp"],
                       keep_manifest=True)
        found = sorted(m.path for m in FileSystems.match(
            [posixpath.join(self.output, f"{latents.PART_PREFIX}-*.parquet")])[0].metadata_list)
        held, changed = self.held_shards(shards, found)
        again = {shard for run in changed.values() for shard in run}
        todo = [shard for shard in shards if shard not in held or shard in again]
        log.info("%d of %d shard(s) already have a part; encoding %d", len(shards) - len(todo), len(shards),
                 len(todo))
        if changed:
            log.warning("%d part(s) hold input shards that changed, were replaced or were removed since they were "
                        "written (size or time differs); encoding them again in place: %s", len(changed),
                        ", ".join(posixpath.basename(p) for p in sorted(changed)[:3]))
        new = [shard for shard in todo if shard not in again]
        index = plan_parts(new, self.sizes, self.part_files, self.part_bytes)
        runs = {}
        for shard, i in zip(new, index):
            runs.setdefault(i, []).append(shard)
        self.part_of = {shard: part_name(run) for run in runs.values() for shard in run}
        # A changed part is written again under its own name, so that it replaces itself.
        self.part_of.update({shard: posixpath.basename(path) for path, run in changed.items() for shard in run})
        self.changed_parts = sorted(posixpath.basename(p) for p in changed)
        rewritten = {posixpath.join(self.output, name) for name in self.part_of.values()}
        # Every part that stays: its keys come before any new one.
        self.existing = [path for path in found if path not in rewritten]
        return todo

    def held_shards(self, shards, paths) -> tuple:
        """(the shards of this run that a part (for this model and latent format) already holds,
        {part path: its shards that are still there} for the parts whose shards changed since they
        were written). Held: by the part's footer's list of shards, or its run of them (first to
        last: the shards of the input between them must be as many as the part recorded), or, for
        parts that record neither, by its name (one part per shard). Changed: the footer's stamp of
        its shards (names, sizes, times) differs from theirs now."""
        ordered = sorted(shards)
        present = set(shards)
        by_name = {}  # part name -> shard, for parts that record no shards (built on first need)
        held, changed = set(), {}
        for path in paths:
            state = part_state(path)
            if state is None or (state.fingerprint, state.latent_format) != (self.spec.fingerprint, self.latent_format):
                continue
            sources = state.sources
            if sources is None:
                by_name = by_name or {part_name([s]): s for s in shards}
                if posixpath.basename(path) in by_name:
                    held.add(by_name[posixpath.basename(path)])
                continue
            if "files" in sources:
                recorded = list(sources["files"])
            elif sources["shards"] == 1:
                recorded = [sources["first"]]
            elif sources["shards"]:
                recorded = ordered[bisect.bisect_left(ordered, sources["first"]):
                                   bisect.bisect_right(ordered, sources["last"])]
                if len(recorded) != sources["shards"]:
                    raise LatentpackError(
                        f"{path} holds {sources['shards']} input shard(s) from {sources['first']} to "
                        f"{sources['last']}, and the input now has {len(recorded)} there: it was not written by an "
                        "incremental run over this input; move it away, or encode without --skip-existing")
            else:
                recorded = []
            held.update(recorded)
            if state.stamp is not None and recorded and stamp(recorded, self.stamps) != state.stamp:
                still = [shard for shard in recorded if shard in present]
                if still:
                    changed[path] = still
                else:
                    log.warning("%s: every input shard it holds is gone; the part is kept", path)
        return held, changed

    def manifest_fn(self):
        extra = dict(self.extra, parts_rewritten=getattr(self, "changed_parts", []))
        return WriteFolderManifest(self.output, self.spec, self.latent_format, extra, self.max_bad_fraction,
                                   self.fatal_reasons, self.planned_paths())
