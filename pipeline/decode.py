"""Decode a latent dataset back into images (an Apache Beam batch job).

    latentpack decode --input latents/ --model-dir model/ --output images/ --output-format png

ListParts -> FindDuplicateKeys (the parts' key columns only, by hash bucket) -> DecodeParts (each
latent part checked, decoded and written by one worker: one output shard per part, or one PNG per
image) -> the manifest. Refuses a dataset made with a
different model (fingerprint mismatch) or one that is incomplete (no manifest).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import posixpath
import sys
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipeline import keys, latents
from pipeline.accounting import (DEFAULT_MAX_BAD_FRACTION, Gather, Progress, add_reasons, count_dead_letter,
                                 count_reasons, counts, finish, reported, summary, write_dead_letters)
from pipeline.artifact import read_spec
from pipeline.codec import codec_class, schema_of, shared_codec
from pipeline.completion import (DEAD_LETTER_DIR, MANIFEST, OutputFolder, clear_previous, is_within, previous_marker,
                                 read_manifest, recorded_files, run_to_completion)
from pipeline.errors import LatentpackError, log
from pipeline.images import DEFAULT_MAX_PIXELS, DeadLetter
from pipeline.outputs import WRITERS, name_identity, unwritten_extras
from pipeline.errors import show_progress
from pipeline.runners import check_beam_args, either_spelling, runner_options

NAMESPACE = "latentpack.decode"


def check_dataset(dataset_dir: str, spec, manifest: dict) -> tuple:
    """Validate a latent dataset (its manifest already read) against the model; returns (part paths,
    their manifest entries)."""
    if manifest.get("format") != "latentpack-dataset":
        raise LatentpackError(f"{dataset_dir}: {MANIFEST} is not a latentpack dataset manifest")
    check_fingerprint(posixpath.join(dataset_dir, MANIFEST), manifest.get("model_fingerprint"), spec, manifest)
    paths = latents.part_paths(dataset_dir, manifest)
    wrong = latents.inconsistencies(manifest)
    if wrong:
        raise LatentpackError(f"{posixpath.join(dataset_dir, MANIFEST)}: {wrong[0]}; refusing to decode "
                              f"(latentpack verify {dataset_dir} lists every problem)")
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
        for field in schema_of(spec, latent_format):
            if field.name not in schema.names:
                if version < latents.COLUMN_SINCE.get(field.name, 1):
                    continue  # a column added since this dataset's version
                raise LatentpackError(f"{path}: lacks the {field.name!r} column")
            if schema.field(field.name).type != field.type:
                raise LatentpackError(f"{path}: column {field.name!r} is {schema.field(field.name).type}, "
                                      f"the model needs {field.type}")
    return paths, manifest["files"]


def check_fingerprint(path: str, fingerprint: str, spec, manifest: Optional[dict] = None) -> None:
    if fingerprint == spec.fingerprint:
        return
    from pipeline import models

    name, version = (manifest or {}).get("model"), (manifest or {}).get("latentpack_version")
    if name:  # a shipped model: this installation may ship a newer one under the same name
        found = models.find(fingerprint)
        raise LatentpackError(
            f"{path} was encoded with the shipped model {name} of latentpack {version} ({fingerprint}); "
            + (f"this installation has it as {found[0]}: leave --model-dir out (or give {found[1]})" if found else
               f"this installation does not ship that model (its {name} is a different one): decode with "
               f"--model-dir set to that model's folder ({models.folder_name(name)} of latentpack {version})"))
    raise LatentpackError(
        f"{path} was encoded with model {fingerprint}, but --model-dir {spec.fingerprint} is "
        "a different model; decode it with the model that encoded it")


def model_for(dataset_dir: str, manifest: dict, model_dir: Optional[str]) -> str:
    """--model-dir as given, or, when it is left out, the model that encoded the dataset: its
    embedded copy, or the shipped (or retired) model with its fingerprint. A shipped name that an
    earlier release gave to the model that encoded it (`--model-dir photo:6` for a dataset of
    0.5.0's photo:6) means that model, kept under models/retired/."""
    from pipeline import models

    fingerprint = manifest.get("model_fingerprint")
    if model_dir:
        if models.is_shipped_name(model_dir) and fingerprint:
            found = models.find(fingerprint)
            if found and found[0].split(" ")[0] == model_dir and found[0] != model_dir:
                log.info("%s was encoded with %s (%s…): decoding with it", dataset_dir, found[0], fingerprint[:19])
                return found[1]
        return models.resolve(model_dir)
    inside = models.embedded(dataset_dir)
    if inside is not None:  # the dataset's own copy (encode --embed-model): checked as any artifact is
        return inside
    found = models.find(fingerprint) if fingerprint else None
    if found is None:
        raise LatentpackError(f"--model-dir is needed: {dataset_dir} was encoded with model {fingerprint}, which "
                              "this installation does not ship; give that model's folder")
    return found[1]


def _stored_key_buckets(element, identity=None):
    """(part, manifest entry) -> (bucket, (part, keys, rows)); nothing for a part that cannot be
    read (the decode step dead-letters it)."""
    path, _ = element
    try:
        stored = keys.stored_keys(path)
    except Exception:
        return []
    return keys.bucketed(path, zip(stored, range(len(stored))), identity=identity)


def part_stem(path: str) -> str:
    """`latents-00003-of-00008.parquet` -> `00003-of-00008`: what the part's output files are named after."""
    name = posixpath.basename(path)
    stem = name[:-len(".parquet")] if name.endswith(".parquet") else name
    prefix = latents.PART_PREFIX + "-"
    return stem[len(prefix):] if stem.startswith(prefix) else stem


class DecodePart(beam.DoFn):
    """(part path, {"entry": [its manifest entry], "later": [(row, (part, row) of the key's first
    occurrence)]}) -> the part's images, written by the output format's writer, and its dead
    letters in `dead_letter/<part>.jsonl` (rows of a key stored earlier are `duplicate_key`);
    yields a summary {part, files, written, reasons, dead_letters}.

    The part's bytes are checked against the manifest's CRC32C first: a part that fails becomes
    one `damaged_part` dead letter per row the manifest gives it, and none of its rows is decoded.
    The model (loaded once per worker process, called only through `decompress`) decodes the next
    rows while one background thread writes the previous batch (PNG encoding, zlib and file
    system calls release the GIL); every write has finished, or raised, before the summary is
    yielded, so a part is never reported with images missing."""

    BATCH_ROWS = 1024

    def __init__(self, model_dir: str, spec, output: str, output_format: str, label_names=None, max_pending: int = 2,
                 max_pixels: int = DEFAULT_MAX_PIXELS, only: Optional[dict] = None, total: int = 0):
        self.model_dir, self.spec, self.output, self.output_format = model_dir, spec, output, output_format
        self.only = only  # partial decode: part -> its selected keys (None: every row)
        self.total = total  # images the job decodes (for progress)
        self.label_names, self.max_pending = (list(label_names) if label_names else None), max_pending
        self.max_pixels = max_pixels

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor

        self.codec = shared_codec(self.model_dir, self.spec)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="latentpack-writer")
        self.images = Metrics.counter(NAMESPACE, "images_decoded")
        self.progress = Progress("decoded", total=self.total)

    def process(self, element):
        path, joined = element
        (expected,) = joined["entry"]
        later = dict(joined["later"])  # row -> (part, row) of the key's first occurrence
        name = posixpath.basename(path)
        letters, written, files = [], 0, []
        problem = latents.check_part(path, expected)
        if problem:
            letters = [DeadLetter(f"{name}:{i}", path, i, "damaged_part", f"{name} {problem}")
                       for i in range(int(expected.get("rows", 1)))]
        else:
            with FileSystems.open(path) as f:  # opened once: its schema names the extra columns
                part = pq.ParquetFile(f)
                extra = latents.extra_names(part.schema_arrow)
                writer = WRITERS[self.output_format](self.output, part_stem(path), self.label_names,
                                                     extra_fields=given_back(part.schema_arrow))
                pending = collections.deque()

                def drain(limit):
                    nonlocal written
                    while len(pending) > limit:
                        n, bad = pending.popleft().result()
                        written += n
                        letters.extend(bad)
                        self.images.inc(n)
                        self.progress.add(n)

                offset = 0
                for rows in part.iter_batches(batch_size=self.BATCH_ROWS):
                    table, numbers = pa.Table.from_batches([rows]), np.arange(offset, offset + rows.num_rows)
                    offset += rows.num_rows
                    repeated = np.flatnonzero(np.isin(numbers, list(later))) if later else ()
                    if len(repeated):
                        row_keys = table.column("key").to_pylist()
                        for i in repeated:
                            where, row, *first_key = later[int(numbers[i])]
                            at = f"{posixpath.basename(where)}:{row}"
                            if first_key and first_key[0] != row_keys[i]:
                                letters.append(DeadLetter(
                                    row_keys[i], path, int(numbers[i]), "name_collision",
                                    f"its file would be key {first_key[0]!r}'s (at {at}): the output's filesystem "
                                    "does not tell file names apart by letter case or Unicode form; only the first "
                                    "is decoded (decode to a case-sensitive folder, or to a shard format)"))
                            else:
                                letters.append(DeadLetter(row_keys[i], path, int(numbers[i]), "duplicate_key",
                                                          f"key also at {at}; only the first row of a key is "
                                                          "decoded"))
                        keep = np.ones(len(numbers), bool)
                        keep[repeated] = False
                        table, numbers = table.filter(pa.array(keep)), numbers[keep]
                    if self.only is not None:
                        import pyarrow.compute as pc

                        keep = pc.is_in(table.column("key"), value_set=pa.array(self.only.get(path, []), pa.string()))
                        keep = keep.to_numpy(zero_copy_only=False)
                        table, numbers = table.filter(pa.array(keep)), numbers[keep]
                        if not table.num_rows:
                            continue
                    extras = with_extras(table, extra)
                    for item in self.codec.decompress(table, self.max_pixels):
                        if isinstance(item, DeadLetter):  # its index: the row in the part
                            letters.append(dataclasses.replace(item, source=item.source or path,
                                                               index=int(numbers[item.index])))
                        else:
                            extras(item)
                            pending.append(self.pool.submit(writer.write, item))
                            drain(self.max_pending)
            drain(0)
            files = writer.close()
        for letter in letters:
            count_dead_letter(NAMESPACE, letter)
        letters_path = posixpath.join(self.output, DEAD_LETTER_DIR, f"{part_stem(path)}.jsonl")
        write_dead_letters(letters_path, letters)
        yield {"part": path, "files": files, "written": written, "reasons": count_reasons(letters),
               "dead_letters": letters_path}

    def teardown(self):
        self.pool.shutdown(wait=True)


def with_extras(table, names):
    """A function that sets a decoded ImageBatch's `extras` (the source's other columns, `names` as
    the part stores them) from the rows of `table` it came from, by key (a table's keys are unique
    here: the later rows of a key are dead letters before decoding); a no-op without extras."""
    if not names:
        return lambda batch: None
    rows = dict(zip(table.column("key").to_pylist(), zip(*(table.column(n).to_pylist() for n in names))))

    def attach(batch):
        batch.extras = [rows.get(key) for key in batch.keys]
    return attach


# The decoded outputs' own columns: an extra column is given back under its source's name unless
# it is one of these (then under the name the latent part stores it by, `source_<name>`).
DECODED_COLUMNS = ("key", "image", "label")


def given_names(part_schema) -> dict:
    """{name as the part stores it: name the decoded outputs and records give} of a part's extra
    columns: the source's own name, unless that is one of the outputs' own columns (then the stored
    `source_<name>`)."""
    return {e["name"]: e["source"] if e["source"] not in DECODED_COLUMNS else e["name"]
            for e in latents.metadata_of(part_schema).get("extra_columns", [])}


def given_back(part_schema) -> list:
    """A part's extra columns as pyarrow fields, named as the decoded outputs give them."""
    return [part_schema.field(stored).with_name(given) for stored, given in given_names(part_schema).items()]


class WriteDecodeManifest(beam.DoFn):
    """Runs once, after every part is decoded: check that each part reported, then write the manifest."""

    def __init__(self, output: str, parts, extra: dict, max_bad_fraction: float, fatal_reasons=()):
        self.output, self.parts, self.extra, self.max_bad_fraction = output, sorted(parts), extra, max_bad_fraction
        self.fatal_reasons = tuple(fatal_reasons)

    def process(self, summaries):
        by_part = reported(summaries, self.parts, "decoded")
        reasons, written = {}, 0
        for s in by_part.values():
            add_reasons(reasons, s["reasons"])
            written += s["written"]
        rel = lambda paths: sorted(posixpath.relpath(p, self.output) for p in paths)  # noqa: E731
        payload = dict(self.extra, format="latentpack-decoded", complete=True, images=written,
                       counts=counts(written, reasons),
                       files=rel(f for s in by_part.values() for f in s["files"]),
                       dead_letter_files=rel(s["dead_letters"] for s in by_part.values()))
        finish(self.output, payload, self.max_bad_fraction, self.fatal_reasons)
        yield payload


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The decode job's own settings (Beam's options travel separately)."""

    input: str
    model_dir: Optional[str]
    output: str
    output_format: str = "png"
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    allow_damaged: bool = False
    max_pixels: Optional[int] = None  # None: the limit the encode job applied (its manifest), else the default
    keys: Optional[tuple] = None  # decode only these keys (--keys, --keys-file)
    limit: Optional[int] = None  # decode only the first N keys in the dataset's order


def parse_args(argv) -> tuple:
    """argv -> (DecodeOptions, Beam's arguments)."""
    p = argparse.ArgumentParser(prog="latentpack decode", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other option is passed to Beam (--runner, --direct_num_workers, ...).")
    p.add_argument("--input", required=True, help="latent dataset directory (from latentpack encode)")
    p.add_argument("--model-dir", default=None,
                   help="the model artifact that encoded the dataset, or a shipped model: photo:<q> (1, 2, 4, 6); when left "
                        "out, the shipped model that encoded it (found by its fingerprint)")
    p.add_argument("--output", required=True, help="directory for the decoded images")
    p.add_argument("--output-format", default="png", choices=sorted(WRITERS), help="how to write the images")
    p.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="fail the job, leaving the output unmarked, if more than this fraction of rows is bad")
    p.add_argument("--allow-damaged", action="store_true",
                   help="decode what is intact: the rows of a part whose checksum fails become `damaged_part` dead "
                        "letters (subject to --max-bad-fraction) instead of failing the job")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="a row claiming an image of more pixels than this is a `too_many_pixels` dead letter, not "
                        f"decoded (default: the limit the dataset was encoded with, else {DEFAULT_MAX_PIXELS})")
    select = p.add_mutually_exclusive_group()
    select.add_argument("--keys", nargs="+", metavar="KEY", help="decode only these keys (partial decode)")
    select.add_argument("--keys-file", help="decode only the keys listed in this file, one per line")
    select.add_argument("--limit", type=int, help="decode only the first N keys (parts in order, keys sorted "
                        "within each part)")
    args, beam_args = p.parse_known_args(either_spelling(p, sys.argv[1:] if argv is None else list(argv)))
    check_beam_args(p, beam_args)
    values = vars(args)
    keys_file = values.pop("keys_file")
    if keys_file is not None:
        try:
            with open(keys_file, encoding="utf-8") as f:
                values["keys"] = [line.rstrip("\r\n") for line in f if line.rstrip("\r\n")]
        except (OSError, UnicodeDecodeError) as e:
            raise LatentpackError(f"--keys-file {keys_file}: cannot be read ({e})") from None
        if not values["keys"]:
            raise LatentpackError(f"--keys-file {keys_file} lists no keys")
    if values["keys"] is not None:
        values["keys"] = tuple(dict.fromkeys(values["keys"]))
    if not (0.0 <= values["max_bad_fraction"] <= 1.0):  # NaN fails this too
        raise LatentpackError(f"--max-bad-fraction must be a fraction from 0 to 1 (got {values['max_bad_fraction']})")
    if values["limit"] is not None and values["limit"] < 1:
        raise LatentpackError(f"--limit must be at least 1 (got {values['limit']})")
    return DecodeOptions(**values), beam_args


def select_keys(paths: list, entries: list, selected: Optional[tuple], limit: Optional[int]) -> tuple:
    """Partial decode: (the parts holding the selected keys, their entries, the keys per part, or
    None for every key). Every --keys key must be in the dataset (else one error naming the
    missing ones); --limit N takes the first N keys in the dataset's order."""
    if selected is None and limit is None:
        return paths, entries, None
    wanted = set(selected or ())
    chosen, found, taken = {}, set(), 0
    for path in paths:
        stored = keys.stored_keys(path)
        if limit is not None:
            mine = stored[:max(0, limit - taken)]
            taken += len(mine)
        else:
            mine = [k for k in stored if k in wanted]
            found.update(mine)
        if mine:
            chosen[path] = sorted(set(mine))
        if limit is not None and taken >= limit:
            break
    missing = [k for k in (selected or ()) if k not in found]
    if missing:
        raise LatentpackError(f"--keys: {len(missing)} key(s) not in the dataset: "
                              + ", ".join(repr(k) for k in missing[:5]) + (" …" if len(missing) > 5 else ""))
    kept = [(p, e) for p, e in zip(paths, entries) if p in chosen]
    return [p for p, _ in kept], [e for _, e in kept], chosen


def run(argv=None, test_pipeline=None):
    """Parse argv and run the decode job; returns the output manifest dict."""
    options, beam_args = parse_args(argv)
    return run_job(options, beam_args, test_pipeline)


def run_job(options: DecodeOptions, beam_args=(), test_pipeline=None) -> dict:
    """Build and run the decode job; returns the output manifest dict."""
    dataset = options.input.rstrip("/")
    manifest = read_manifest(dataset)
    model_dir = model_for(dataset, manifest, options.model_dir)
    spec = read_spec(model_dir)
    paths, entries = check_dataset(dataset, spec, manifest)
    paths, entries, only = select_keys(paths, entries, options.keys, options.limit)
    max_pixels = pixel_limit(options.max_pixels, manifest)
    output = options.output.rstrip("/")
    unwritten = unwritten_extras(options.output_format, manifest.get("extra_columns", []))
    if unwritten:
        log.warning("the dataset keeps the input's other column(s) %s beside the codes (where the input had "
                    "any); --output-format %s has no place for them (--output-format parquet writes them back; "
                    "latentpack.open gives them): the images are decoded without them", ", ".join(unwritten),
                    options.output_format)
    if is_within(output, dataset):
        raise LatentpackError(f"--output {output} is, or is inside, the --input dataset {dataset}; decoding there "
                              "would replace the dataset's own manifest and dead letters: choose another folder")
    earlier = previous_marker(output, "decode")
    if earlier is not None and earlier.get("source") not in (None, dataset):
        raise LatentpackError(f"--output {output} holds the decode of another dataset ({earlier.get('source')}); "
                              "decoding there would replace it: choose another folder")
    claim = OutputFolder(output, "decode")
    claim.claim()
    try:
        return _build_and_run(options, beam_args, test_pipeline, spec, model_dir, dataset, paths, entries, output,
                              claim, manifest.get("label_names"), max_pixels, only)
    finally:
        claim.release()


def pixel_limit(option: Optional[int], manifest: dict) -> int:
    """Decode's pixel limit per image: --max-pixels, else the encode job's own (recorded in the
    manifest since 0.4.1), else encode's default. The height and width of a row are data: a
    damaged or hostile dataset can claim gigapixels for a few bytes of code."""
    if option is not None:
        if option < 1:
            raise LatentpackError(f"--max-pixels must be at least 1 (got {option}); it is the largest image, in "
                                  "pixels, that decode will make")
        return option
    recorded = manifest.get("max_pixels")
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1 \
        else DEFAULT_MAX_PIXELS


def _build_and_run(options, beam_args, test_pipeline, spec, model_dir, dataset, paths, entries, output, claim,
                   label_names=None, max_pixels=DEFAULT_MAX_PIXELS, only=None):
    # PNG files are one per key and are overwritten in place; shard files an earlier decode recorded
    # (its manifest or failure marker) are replaced: a file that only looks like one is never deleted.
    # Writers' temporary files and the dead letters (a folder of the job's own) always are the job's.
    always_ours = ([f"images-*.{ext}.tmp" for ext in ("tfrecord", "npz", "parquet", "tar")]
                   + [f"{DEAD_LETTER_DIR}/*.jsonl", f"{DEAD_LETTER_DIR}/*.jsonl.tmp"])
    owned = recorded_files(output, previous_marker(output, "decode")) + [
        m.path for pattern in always_ours for m in FileSystems.match([posixpath.join(output, pattern)])[0].metadata_list]
    clear_previous(output, [f"images-*.{ext}" for ext in ("tfrecord", "npz", "parquet", "tar")] + always_ours,
                   owned=owned)
    extra = {"job": "decode", "source": dataset, "output_format": options.output_format,
             "model_fingerprint": spec.fingerprint, "max_pixels": max_pixels}
    total = sum(int(e.get("rows", 0)) for e in entries)  # the images to decode (progress)
    if only is not None:
        extra["selected_keys"] = total = sum(len(v) for v in only.values())
    fatal = () if options.allow_damaged else ("damaged_part",)
    p = test_pipeline or beam.Pipeline(options=runner_options(beam_args, len(paths)))
    listed = (p
              | "ListParts" >> beam.Create(list(zip(paths, entries)))
              | "SpreadParts" >> beam.Reshuffle())
    # A key stored twice (only a hand-made or tampered dataset has one: encode keeps the first)
    # would be two images written to one file: the later rows are dead letters instead.
    # One file per key (png) on a filesystem that folds case (macOS, Windows): keys that differ
    # only in case would be one file too, so they count as one key (dead letters `name_collision`).
    identity = name_identity(output) if options.output_format == "png" else None
    later = (listed
             | "KeyBuckets" >> beam.FlatMap(_stored_key_buckets, identity)
             | "GroupBuckets" >> beam.GroupByKey()
             | "LaterOccurrences" >> beam.FlatMap(keys.later_occurrences, identity=identity))
    ({"entry": listed, "later": later}
     | "JoinDuplicates" >> beam.CoGroupByKey()
     | "DecodeParts" >> beam.ParDo(DecodePart(model_dir, spec, output, options.output_format, label_names,
                                              max_pixels=max_pixels, only=only, total=total))
     | "GatherSummaries" >> Gather()
     | "WriteManifest" >> beam.ParDo(WriteDecodeManifest(output, paths, extra, options.max_bad_fraction, fatal)))
    return run_to_completion(p, output, "decoded output", claim)


def main(argv=None) -> int:
    show_progress()
    manifest = run(argv)
    print(summary(manifest, f"decoded {manifest['counts']['written']} images as {manifest['output_format']}"))
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
