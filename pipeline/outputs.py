"""Decoded-image outputs: a registry of writers sharing one small interface.

A writer is a PTransform from ImageBatch elements to `(written, dead_letters, files)`:
per-batch counts of images written, DeadLetters, and the paths of finalized shard
files (empty for writers that write one file per image).
"""
from __future__ import annotations

import collections
import errno
import posixpath
from typing import Dict

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import tfrecord
from pipeline.accounting import DEAD_LETTER_TAG
from pipeline.images import DeadLetter, encode_png

WRITERS: Dict[str, type] = {}
NAME_MAX = 255  # bytes in one file or folder name on common file systems
# Errors that say a key cannot be a file here (not that the disk is full or read-only).
_KEY_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ}


def register(cls):
    WRITERS[cls.name] = cls
    return cls


def safe_relative_path(key: str) -> str:
    """The relative path a key maps to under the output folder, or ValueError if it would escape."""
    if not key or "\\" in key or "\0" in key or key.startswith("/") or "://" in key:
        raise ValueError(f"key {key!r} is not a safe relative path")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"key {key!r} has empty, '.' or '..' path components")
    return key


class BackgroundDoFn(beam.DoFn):
    """A DoFn whose per-element work runs on one background thread, up to `max_pending` elements
    behind the caller, so that encoding and writing images overlaps the model decoding the next
    batch (TensorFlow, zlib and file system calls release the GIL).

    Subclasses call `self.submit(fn, *args)` from `process` and `yield from` it: it yields the
    results of finished work in submission order. Every piece of work has finished, and any error
    has been raised, before the bundle completes, so a bundle never commits with output missing.
    Results still pending at the end of a bundle are emitted in the global window, where every
    element of these batch jobs lives.
    """

    def __init__(self, max_pending: int = 2):
        self.max_pending = max_pending

    def setup(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"latentpack-{type(self).__name__}")

    def start_bundle(self):
        self.pending = collections.deque()

    def submit(self, fn, *args):
        self.pending.append(self.pool.submit(fn, *args))
        while self.pending and (len(self.pending) > self.max_pending or self.pending[0].done()):
            yield from self.emit(self.pending.popleft().result())

    def emit(self, result):
        """The outputs of one finished piece of work (default: the result itself)."""
        yield result

    def finish_bundle(self):
        while self.pending:
            for out in self.emit(self.pending.popleft().result()):
                if isinstance(out, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, MIN_TIMESTAMP, [GlobalWindow()]))
                else:
                    yield WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])

    def teardown(self):
        self.pool.shutdown(wait=True)


# ---------------------------------------------------------------- plain writers (no runner)
# The file formats themselves, as classes with `write(batch)` and `close()`: the Beam transforms
# below wrap them, and a plain loop (scripts/benchkit, a notebook) uses them directly.

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
        images = batch.images if len(rows) == len(batch) else batch.images[rows]
        return paths, images, letters

    def write_files(self, paths, images):
        """(images written, dead letters): a key whose file cannot exist (a file where its folder
        should be, as for keys `a.png` and `a.png/b`) is a dead letter; a full or read-only disk
        fails the job, naming the file."""
        written, letters = 0, []
        for path, image in zip(paths, images):
            try:
                with FileSystems.create(path) as f:
                    f.write(encode_png(image))
                written += 1
            except OSError as e:
                if e.errno not in _KEY_ERRNOS:  # name the file: "no space left" alone does not say where
                    raise OSError(e.errno, e.strerror, path) from None
                key = path[len(self.output) + 1:-len(".png")]
                letters.append(DeadLetter(key, "", -1, "unwritable_key", f"{path}: {e.strerror}"))
        return written, letters

    def write(self, batch):
        """(images written, dead letters)."""
        paths, images, letters = self.plan(batch)
        written, more = self.write_files(paths, images)
        return written, letters + more

    def close(self) -> list:
        return []


class TFRecordShard:
    """One TFRecord file of PNG Examples, in the schema the encoder reads."""

    def __init__(self, path: str):
        self.path, self.handle = path, FileSystems.create(path)

    def write(self, batch):
        self.handle.write(frame_examples(batch))
        return len(batch), []

    def close(self) -> list:
        self.handle.close()
        return [self.path]


# ---------------------------------------------------------------- Beam transforms

class WritePngFn(BackgroundDoFn):
    """One PNG file per image, written in the background (creating a file costs the kernel 30-400
    microseconds here, about as much as decoding and compressing the image); yields counts."""

    def __init__(self, output: str, max_pending: int = 2):
        super().__init__(max_pending)
        self.output = output

    def setup(self):
        super().setup()
        self.files = PngFiles(self.output)

    def process(self, batch):
        paths, images, letters = self.files.plan(batch)
        for letter in letters:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)
        yield from self.submit(self.files.write_files, paths, images)

    def emit(self, result):
        written, letters = result
        yield written
        for letter in letters:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


class InBackground(BackgroundDoFn):
    """`fn(element)` for each element, computed in the background (e.g. PNG-encoding a batch)."""

    def __init__(self, fn, max_pending: int = 2):
        super().__init__(max_pending)
        self.fn = fn

    def process(self, element):
        yield from self.submit(self.fn, element)


class ImageWriter(beam.PTransform):
    """The writer interface: constructed with the output folder, expands to (written, dead_letters, files)."""

    name = ""

    def __init__(self, output: str):
        super().__init__()
        self.output = output


@register
class PngWriter(ImageWriter):
    """`<output>/<key>.png`; a '/' in a key makes sub-folders."""

    name = "png"

    def expand(self, batches):
        out = batches | "WritePngFiles" >> beam.ParDo(WritePngFn(self.output)).with_outputs(DEAD_LETTER_TAG, main="n")
        return out.n, out[DEAD_LETTER_TAG], batches.pipeline | "NoShardFiles" >> beam.Create([])


class ShardFileWriter(ImageWriter):
    """Base for writers of shard files that accept every image: subclasses define `write_files`."""

    def write_files(self, batches):
        """ImageBatch elements -> PCollection of the paths written."""
        raise NotImplementedError

    def expand(self, batches):
        files = self.write_files(batches)
        written = batches | "Count" >> beam.Map(len)
        return written, batches.pipeline | "NoDeadLetters" >> beam.Create([]), files


class _FramedBytesSink(filebasedsink.FileBasedSink):
    """A file sink whose elements are already-framed blobs of many records each."""

    def __init__(self, prefix: str, suffix: str):
        super().__init__(prefix, coder=coders.BytesCoder(), file_name_suffix=suffix,
                         mime_type="application/octet-stream")

    def write_encoded_record(self, file_handle, encoded_value):
        file_handle.write(encoded_value)


def frame_examples(batch) -> bytes:
    """An ImageBatch as TFRecord-framed tf.train.Examples, one blob per batch."""
    return b"".join(
        tfrecord.frame(tfrecord.make_example(
            encode_png(batch.images[i]), key, int(batch.labels[i]) if batch.has_label[i] else None))
        for i, key in enumerate(batch.keys))


@register
class TFRecordWriter(ShardFileWriter):
    """`<output>/images-SSSSS-of-NNNNN.tfrecord` with the Example schema the encoder reads."""

    name = "tfrecord"

    def write_files(self, batches):
        return (batches
                | "FrameExamples" >> beam.ParDo(InBackground(frame_examples))
                | "WriteShards" >> beam.io.Write(_FramedBytesSink(posixpath.join(self.output, "images"), ".tfrecord")))


class WriteNpzFn(beam.DoFn):
    """One `.npz` per batch, named by a hash of its keys (stable across re-runs)."""

    def __init__(self, output: str):
        self.output = output

    def process(self, batch):
        import hashlib
        import io

        import numpy as np

        name = hashlib.sha1("\0".join(batch.keys).encode()).hexdigest()[:16]
        buf = io.BytesIO()
        np.savez(buf, images=batch.images, labels=batch.labels, keys=np.array(batch.keys))
        path = posixpath.join(self.output, f"images-{name}.npz")
        with FileSystems.create(path + ".tmp") as f:
            f.write(buf.getvalue())
        FileSystems.rename([path + ".tmp"], [path])
        yield path


@register
class NpzWriter(ShardFileWriter):
    """`<output>/images-<hash>.npz` with `images` [N,H,W,C], `labels` (-1: none) and `keys`."""

    name = "npz"

    def write_files(self, batches):
        return batches | "WriteNpz" >> beam.ParDo(WriteNpzFn(self.output))


def image_table(batch):
    """An ImageBatch as an Arrow table in Hugging Face's image layout."""
    import pyarrow as pa

    pngs = pa.array([encode_png(x) for x in batch.images], pa.binary())
    paths = pa.array([k + ".png" for k in batch.keys], pa.string())
    image = pa.StructArray.from_arrays([pngs, paths], names=["bytes", "path"])
    label = pa.array(batch.labels, pa.int64(), mask=~batch.has_label)
    return pa.Table.from_arrays([pa.array(batch.keys, pa.string()), image, label], schema=IMAGE_SCHEMA)


def _image_schema():
    import pyarrow as pa
    return pa.schema([("key", pa.string()),
                      ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("label", pa.int64())])


IMAGE_SCHEMA = _image_schema()


@register
class ParquetImagesWriter(ShardFileWriter):
    """`<output>/images-SSSSS-of-NNNNN.parquet`: `key`, `image` {bytes (PNG), path}, `label`."""

    name = "parquet"

    def write_files(self, batches):
        return (batches
                | "ToTables" >> beam.ParDo(InBackground(image_table))
                | "WriteParquet" >> beam.io.WriteToParquetBatched(
                    posixpath.join(self.output, "images"), schema=IMAGE_SCHEMA, codec="zstd",
                    file_name_suffix=".parquet"))
