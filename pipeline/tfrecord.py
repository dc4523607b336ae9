"""TFRecord framing and the `tf.train.Example` image schema latentpack reads and writes.

Framing is read here rather than through tf.data so that a bad record becomes one
dead letter with its index, instead of an exception that ends the whole shard.
Schema: `image/encoded` (PNG/JPEG bytes), optional `image/class/label` (int64) and
`image/key` (bytes).
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from typing import BinaryIO, Iterator, Optional, Tuple, Union

import google_crc32c

from pipeline.errors import BadImage

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One record in TFRecord framing: length, crc(length), data, crc(data)."""
    length = struct.pack("<Q", len(record))
    return b"".join((length, struct.pack("<I", masked_crc(length)), record,
                     struct.pack("<I", masked_crc(record))))


def read_records(f: BinaryIO) -> Iterator[Tuple[int, Union[bytes, BadImage]]]:
    """Yield (index, record bytes) or (index, BadImage) for each framed record.

    A record whose data CRC fails is reported and skipped; a broken length field or a
    truncated tail loses the framing, so it is reported once and reading stops.
    """
    index = 0
    while True:
        header = f.read(12)
        if not header:
            return
        if len(header) < 12:
            yield index, BadImage("truncated", f"file ends inside the header of record {index}")
            return
        length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
        if masked_crc(length_bytes) != length_crc:
            yield index, BadImage("bad_crc", f"length CRC mismatch at record {index}; the rest of the file is unreadable")
            return
        (length,) = struct.unpack("<Q", length_bytes)
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
            yield index, BadImage("truncated", f"file ends inside record {index}")
            return
        if masked_crc(data) != struct.unpack("<I", footer)[0]:
            yield index, BadImage("bad_crc", f"data CRC mismatch in record {index}")
        else:
            yield index, data
        index += 1


def make_example(encoded: bytes, key: Optional[str] = None, label: Optional[int] = None) -> bytes:
    """Serialize one image as a tf.train.Example."""
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    feat = ex.features.feature
    feat["image/encoded"].bytes_list.value.append(encoded)
    if key is not None:
        feat["image/key"].bytes_list.value.append(key.encode("utf-8"))
    if label is not None:
        feat["image/class/label"].int64_list.value.append(int(label))
    return ex.SerializeToString(deterministic=True)  # map entries sorted: the same bytes in every process


@functools.lru_cache(maxsize=None)
def _example_class():
    """tf.train.Example, imported on first use (importing it imports TensorFlow)."""
    from tensorflow.core.example import example_pb2
    return example_pb2.Example


@dataclasses.dataclass(frozen=True)
class ExampleNames:
    """Which features of a tf.train.Example hold the image bytes, the integer label and the key.
    The default is the TF-slim/ImageNet convention; TFDS names them after its FeaturesDict
    (`image`, `label`)."""

    image: str = "image/encoded"
    label: Optional[str] = "image/class/label"
    key: Optional[str] = "image/key"


SLIM = ExampleNames()


def feature_kinds(record: bytes) -> dict:
    """{feature name: "bytes" | "int64" | "float" | "empty"} of one serialized Example."""
    ex = _example_class().FromString(record)
    return {name: (f.WhichOneof("kind") or "empty").replace("_list", "")
            for name, f in sorted(ex.features.feature.items())}


def parse_example(record: bytes, names: ExampleNames = SLIM) -> Tuple[bytes, Optional[str], Optional[int]]:
    """tf.train.Example bytes -> (encoded image, key or None, label or None), or BadImage."""
    return parse_example_and_rest(record, names)[:3]


def parse_example_and_rest(record: bytes, names: ExampleNames = SLIM):
    """tf.train.Example bytes -> (encoded image, key or None, label or None, the rest), or
    BadImage. The rest: the Example's other features (TF-slim's image/height, a TFDS dataset's
    `id` or `objects/bbox`, ...) as one serialized tf.train.Example, or None when it has none."""
    try:
        ex = _example_class().FromString(record)
    except Exception as e:
        raise BadImage("bad_record", f"not a tf.train.Example: {e}") from None
    # One `get` per feature: every map lookup and field access builds Python wrappers, and this
    # runs once per image in each of the encode job's two passes.
    feat = ex.features.feature
    image = feat.get(names.image)
    values = image.bytes_list.value if image is not None else ()
    if not values:
        raise BadImage("missing_image", f"Example has no {names.image} bytes")
    encoded = values[0]
    key = label = None
    feature = feat.get(names.key) if names.key else None
    if feature is not None:
        values = feature.bytes_list.value
        if values:
            try:
                key = values[0].decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadImage("bad_key", f"{names.key} is not UTF-8 text: {e}") from None
    feature = feat.get(names.label) if names.label else None
    if feature is not None:
        values = feature.int64_list.value
        if values:
            label = int(values[0])
        elif feature.bytes_list.value or feature.float_list.value:
            raise BadImage("bad_label", f"{names.label} is not an int64 feature")
    rest = None
    if len(feat) > 1 + (names.key in feat if names.key else 0) + (names.label in feat if names.label else 0):
        for name in (names.image, names.key, names.label):
            if name and name in feat:
                del feat[name]
        rest = ex.SerializeToString(deterministic=True)
    return encoded, key, label, rest


def merge_rest(example: bytes, rest: Optional[bytes]) -> bytes:
    """An Example written by `make_example` with the source's other features (`rest`) added back;
    `image/format` says what the image now is (PNG)."""
    if not rest:
        return example
    ex = _example_class().FromString(example)
    other = _example_class().FromString(rest)
    feat = ex.features.feature
    for name, value in other.features.feature.items():
        if name not in feat:
            feat[name].CopyFrom(value)
    if "image/format" in other.features.feature:
        feat["image/format"].ClearField("bytes_list")
        feat["image/format"].bytes_list.value.append(b"png")
    return ex.SerializeToString(deterministic=True)


def write_shard(path: str, images, keys=None, labels=None, extra_records=()) -> str:
    """A TFRecord shard of PNG Examples: `images` are uint8 arrays or already-encoded bytes; keys
    and labels optional (None entries left out). Used by the demo, the benchmarks and the tests."""
    from apache_beam.io.filesystems import FileSystems

    from pipeline.images import encode_png

    with FileSystems.create(path) as f:
        for i, image in enumerate(images):
            encoded = image if isinstance(image, (bytes, bytearray)) else encode_png(image)
            key = None if keys is None else keys[i]
            label = None if labels is None or labels[i] is None else int(labels[i])
            f.write(frame(make_example(bytes(encoded), key, label)))
        for record in extra_records:
            f.write(frame(record))
    return path
