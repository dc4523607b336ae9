"""Decoded-image outputs: a registry of plain file writers sharing one small interface.

The decode job opens one writer per latent part (`WRITERS[format](output, part stem, label names)`) and
feeds it that part's ImageBatches; `write(batch)` returns the images written and the dead
letters of keys that cannot be files, `close()` the shard files it finalized. The writers know
nothing of Beam: a plain loop (scripts/benchkit, a notebook) uses them directly.
"""
from __future__ import annotations

import errno
import functools
import os
import posixpath
import unicodedata
from typing import Callable, Dict, Optional


from pipeline import tfrecord
from pipeline.completion import NAME_PROBE, commit, create_file, write_bytes
from pipeline.images import DeadLetter
from pipeline.latents.schema import FEATURES, MEMBERS

WRITERS: Dict[str, Callable] = {}
NAME_MAX = 255  # bytes in one file or folder name on common file systems
# Errors that say a key cannot be a file here (not that the disk is full or read-only).
_KEY_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ}


def register(name: str):
    def add(factory):
        WRITERS[name] = factory
        return factory
    return add


def safe_relative_path(key: str) -> str:
    """The relative path a key maps to under the output folder, or ValueError if it would escape."""
    if not key or "\\" in key or "\0" in key or key.startswith("/") or "://" in key:
        raise ValueError(f"key {key!r} is not a safe relative path")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"key {key!r} has empty, '.' or '..' path components")
    return key


def folded_name(key: str, case: bool, unicode: bool) -> str:
    """A key as a filesystem that folds letter case and/or Unicode normalization sees its name."""
    key = unicodedata.normalize("NFC", key) if unicode else key
    return key.casefold() if case else key


def name_identity(folder: str) -> Optional[Callable[[str], str]]:
    """How the filesystem of a local output folder tells file names apart: None when exactly, or
    `folded_name` for it when names that differ only in letter case (macOS and Windows by default,
    many mounts) or only in Unicode normalization (é as one code point or as e and an accent)
    are one file, so that two such keys would write one file. Probed with a file of our own,
    created and removed at once."""
    if "://" in folder:
        return None  # object stores tell every name apart
    probe = os.path.join(folder, NAME_PROBE)
    try:
        with open(probe, "x"):
            pass
    except OSError:  # no names of this kind here (its writes would fail by name, as dead letters)
        return None
    try:
        stem = NAME_PROBE[:-2]
        case = os.path.exists(os.path.join(folder, stem.upper() + NAME_PROBE[-2:]))
        unicode = os.path.exists(os.path.join(folder, unicodedata.normalize("NFD", NAME_PROBE)))
    finally:
        os.remove(probe)
    return functools.partial(folded_name, case=case, unicode=unicode) if case or unicode else None


class PngFiles:
    """`<output>/<key>.png` per image. `plan(batch)` splits a batch into the paths to write and
    the dead letters of keys that are not safe relative paths; `write_files` writes them."""

    def __init__(self, output: str):
        self.output = output

    def plan(self, batch):
        paths, rows, letters = [], [], []
        for i, key in enumerate(batch.keys):
            try:
                rel = safe_relative_path(key)
                if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in (rel + ".png").split("/")):
                    raise ValueError(f"key {key[:60]!r}… has a path component longer than {NAME_MAX} bytes")
            except ValueError as e:
                letters.append(DeadLetter(key, "", i, "unsafe_key", str(e)))
                continue
            paths.append(posixpath.join(self.output, rel + ".png"))
            rows.append(i)
        return paths, rows, letters

    def write_files(self, paths, batch, rows):
        """(images written, dead letters): a key whose file cannot exist (a file where its folder
        should be, as for keys `a.png` and `a.png/b`) is a dead letter; a full or read-only disk
        fails the job, naming the file."""
        written, letters = 0, []
        for path, row in zip(paths, rows):
            try:
                with create_file(path) as f:
                    f.write(batch.png(row))
                written += 1
            except OSError as e:
                if e.errno not in _KEY_ERRNOS:  # name the file: "no space left" alone does not say where
                    raise OSError(e.errno, e.strerror, path) from None
                key = path[len(self.output) + 1:-len(".png")]
                letters.append(DeadLetter(key, "", -1, "unwritable_key", f"{path}: {e.strerror}"))
        return written, letters

    def write(self, batch):
        """(images written, dead letters)."""
        paths, rows, letters = self.plan(batch)
        written, more = self.write_files(paths, batch, rows)
        return written, letters + more

    def close(self) -> list:
        return []


class _RenamedOnClose:
    """A shard file written under a temporary name and renamed when closed: a file with the final
    name is always whole, and a retried task writes it again from the start."""

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"

    def _commit(self) -> list:
        commit(self.tmp, self.path)
        return [self.path]


class TFRecordShard(_RenamedOnClose):
    """One TFRecord file of PNG Examples, in the schema the encoder reads, with a TFRecord or TFDS
    input's other features (its `features` column) added back."""

    def __init__(self, path: str, extra_fields=()):
        super().__init__(path)
        self.handle = create_file(self.tmp)
        names = [f.name for f in extra_fields]
        self.features = names.index(FEATURES) if FEATURES in names else None

    def write(self, batch):
        self.handle.write(frame_examples(batch, self.features))
        return len(batch), []

    def close(self) -> list:
        self.handle.close()
        return self._commit()


class ParquetImagesShard(_RenamedOnClose):
    """One Parquet file in Hugging Face's image layout: `key`, `image` {bytes (PNG), path}, `label`,
    with the `huggingface` schema metadata that `datasets` reads: `image` opens as an `Image`
    feature, and `label` as a `ClassLabel` when the class names are known."""

    def __init__(self, path: str, label_names=None, extra_fields=()):
        import pyarrow.parquet as pq

        super().__init__(path)
        self.schema = image_schema(label_names, extra_fields)
        self.handle = create_file(self.tmp)
        self.writer = pq.ParquetWriter(self.handle, self.schema, compression="zstd")

    def write(self, batch):
        self.writer.write_table(image_table(batch, self.schema))
        return len(batch), []

    def close(self) -> list:
        self.writer.close()
        self.handle.close()
        return self._commit()


class WebDatasetShard(_RenamedOnClose):
    """One WebDataset tar shard: `<key>.png`, where there is a label `<key>.cls`, and the source
    sample's other files (a WebDataset input's `members`: `<key>.txt`, `<key>.json`) per image, in
    key order, with fixed member metadata (the same bytes from every runner). WebDataset cuts a
    member name at the first dot of its base name, so a key with a dot there cannot round-trip:
    it is a dead letter `unsafe_key`."""

    def __init__(self, path: str, extra_fields=()):
        import tarfile

        super().__init__(path)
        self.handle = create_file(self.tmp)
        self.tar = tarfile.open(fileobj=self.handle, mode="w|", format=tarfile.PAX_FORMAT)
        # A WebDataset input's other files (`formats.WebDatasetReader.MEMBERS`) go back as members.
        names = [f.name for f in extra_fields]
        self.members = names.index(MEMBERS) if MEMBERS in names else None

    def _add(self, name: str, data: bytes) -> None:
        import io
        import tarfile

        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, batch):
        written, letters = 0, []
        for i, key in enumerate(batch.keys):
            try:
                safe_relative_path(key)
                if "." in posixpath.basename(key):
                    raise ValueError(f"key {key!r} has a '.' in its last component, where WebDataset ends keys")
                self._add(key + ".png", batch.png(i))
            except ValueError as e:
                letters.append(DeadLetter(key, "", i, "unsafe_key", str(e)))
                continue
            if batch.has_label[i]:
                self._add(key + ".cls", str(int(batch.labels[i])).encode())
            row = batch.extras[i] if batch.extras and self.members is not None else None
            for ext, data in (row[self.members] or []) if row else []:
                if ext not in ("png", "cls"):
                    self._add(f"{key}.{ext}", data)
            written += 1
        return written, letters

    def close(self) -> list:
        self.tar.close()
        self.handle.close()
        return self._commit()


class NpzFiles:
    """One `.npz` per batch (`images` [N,H,W,C], `labels` (-1: none), `keys`), named by a hash of
    its keys, so a re-run writes the same names."""

    def __init__(self, output: str):
        self.output, self.files = output, []

    def write(self, batch):
        import hashlib
        import io

        import numpy as np

        name = hashlib.sha1("\0".join(batch.keys).encode()).hexdigest()[:16]
        buf = io.BytesIO()
        np.savez(buf, images=batch.images, labels=batch.labels, keys=np.array(batch.keys))
        path = posixpath.join(self.output, f"images-{name}.npz")
        write_bytes(path, buf.getvalue())
        self.files.append(path)
        return len(batch), []

    def close(self) -> list:
        return list(self.files)


def frame_examples(batch, features: Optional[int] = None) -> bytes:
    """An ImageBatch as TFRecord-framed tf.train.Examples, one blob per batch; `features`: which of
    the batch's extras holds the source Example's other features (added back), or None."""
    def rest(i):
        row = batch.extras[i] if features is not None and batch.extras else None
        return row[features] if row else None

    return b"".join(
        tfrecord.frame(tfrecord.merge_rest(tfrecord.make_example(
            batch.png(i), key, int(batch.labels[i]) if batch.has_label[i] else None), rest(i)))
        for i, key in enumerate(batch.keys))


def image_table(batch, schema=None):
    """An ImageBatch as an Arrow table in Hugging Face's image layout (`schema`: `image_schema`'s,
    whose columns after `label` are the source's other columns, from `batch.extras`)."""
    import pyarrow as pa

    schema = schema or IMAGE_SCHEMA
    pngs = pa.array([batch.png(i) for i in range(len(batch))], pa.binary())
    paths = pa.array([k + ".png" for k in batch.keys], pa.string())
    image = pa.StructArray.from_arrays([pngs, paths], names=["bytes", "path"])
    label = pa.array(batch.labels, pa.int64(), mask=~batch.has_label)
    arrays = [pa.array(batch.keys, pa.string()), image, label]
    for i, field in enumerate(list(schema)[3:]):
        arrays.append(pa.array([row[i] if row is not None else None for row in batch.extras]
                               if batch.extras else [None] * len(batch), field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def image_schema(label_names=None, extra_fields=()):
    """The decoded Parquet schema, with the `huggingface` metadata that types its columns; the
    source's other columns (`extra_fields`) after `label`, typed as `datasets` reads them."""
    import json

    import pyarrow as pa

    label = ({"names": [str(n) for n in label_names], "_type": "ClassLabel"} if label_names
             else {"dtype": "int64", "_type": "Value"})
    features = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}, "label": label}
    fields = [pa.field("key", pa.string()), pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
              pa.field("label", pa.int64())] + list(extra_fields)
    for field in extra_fields:
        feature = hf_feature(field.type)
        if feature is not None:  # another type's feature `datasets` tells from the Arrow type itself
            features[field.name] = feature
    return pa.schema(fields, metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def hf_feature(arrow_type):
    """The `datasets` feature (as JSON) of an Arrow type, for the types tables commonly hold
    (scalars, strings, bytes, lists of them), or None (`datasets` then types the column from the
    Arrow type itself)."""
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = hf_feature(arrow_type.value_type)
        return None if inner is None else {"feature": inner, "_type": "Sequence"}
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary",
             pa.large_binary(): "large_binary", pa.bool_(): "bool"}
    if arrow_type in names:
        return {"dtype": names[arrow_type], "_type": "Value"}
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return {"dtype": str(arrow_type), "_type": "Value"}
    return None


IMAGE_SCHEMA = image_schema()


# ---------------------------------------------------------------- the registry
# `WRITERS[format](output, stem, label_names)`: the writer for the images decoded from one latent
# part (`stem` names the part, e.g. `00003-of-00008`; `label_names` are the class names the input
# declared, or None), with `write(batch) -> (written, dead letters)` and `close() -> [paths of the
# shard files written]` (none for one file per image).

# The source's other columns each output writes back (None: all of them); the others have no place.
WRITES_EXTRAS = {"parquet": None, "webdataset": (MEMBERS,), "tfrecord": (FEATURES,)}


def unwritten_extras(output_format: str, names) -> list:
    """Those of a dataset's extra columns `names` that decoding to `output_format` leaves out."""
    kept = WRITES_EXTRAS.get(output_format, ())
    return [] if kept is None else [n for n in names if n not in kept]


@register("png")
def _png_writer(output: str, stem: str, label_names=None, extra_fields=()):
    """`<output>/<key>.png`; a '/' in a key makes sub-folders."""
    return PngFiles(output)


@register("tfrecord")
def _tfrecord_writer(output: str, stem: str, label_names=None, extra_fields=()):
    """`<output>/images-<part>.tfrecord` with the Example schema the encoder reads."""
    return TFRecordShard(posixpath.join(output, f"images-{stem}.tfrecord"), extra_fields)


@register("npz")
def _npz_writer(output: str, stem: str, label_names=None, extra_fields=()):
    """`<output>/images-<hash>.npz` per batch."""
    return NpzFiles(output)


@register("parquet")
def _parquet_writer(output: str, stem: str, label_names=None, extra_fields=()):
    """`<output>/images-<part>.parquet` in Hugging Face's image layout (`datasets.load_dataset("parquet")`)."""
    return ParquetImagesShard(posixpath.join(output, f"images-{stem}.parquet"), label_names, extra_fields)


@register("webdataset")
def _webdataset_writer(output: str, stem: str, label_names=None, extra_fields=()):
    """`<output>/images-<part>.tar` WebDataset shards (`webdataset.WebDataset`)."""
    return WebDatasetShard(posixpath.join(output, f"images-{stem}.tar"), extra_fields)
