"""Image batches and the pure functions between encoded image bytes and pixel arrays.

Nothing here opens a file: readers hand over bytes or arrays, writers take bytes.
"""
from __future__ import annotations

import dataclasses
import io
import struct
from typing import Iterable, Optional

import numpy as np
import pyspng
from PIL import Image

from pipeline.errors import BadImage

# Generous default: 64 megapixels. Checked from the header, before pixels are decoded.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


@dataclasses.dataclass
class SourceRecord:
    """One image as a reader found it: encoded bytes or an already-decoded array."""

    key: str
    source: str
    index: int
    encoded: Optional[bytes] = None
    pixels: Optional[np.ndarray] = None
    label: Optional[int] = None
    # Set by a reader when the record itself is unreadable (bad framing, missing field).
    error: Optional[BadImage] = None
    # The values of the source's other columns (`Reader.extra_fields`, in their order), or None.
    extra: Optional[tuple] = None


@dataclasses.dataclass
class DeadLetter:
    """An input that did not make it into the output, and why."""

    key: str
    source: str
    index: int
    reason: str
    error: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ImageBatch:
    """A batch of same-shaped images travelling together through a pipeline."""

    keys: list
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]; -1 where the source has no label
    has_label: np.ndarray  # bool [N]
    # The source's pixel mode per image (e.g. "CMYK", "I;16") when it was converted; None: as stored.
    modes: Optional[list] = None
    # Per image, the ICC colour profile its pixels are in (None: none, i.e. sRGB); None: none at all.
    icc_profiles: Optional[list] = None
    # Per image, the values of the source's other columns (a tuple each); None: the source has none.
    extras: Optional[list] = None

    def __post_init__(self):
        if self.icc_profiles is not None and all(p is None for p in self.icc_profiles):
            self.icc_profiles = None  # none at all: the common case costs nothing downstream

    def __len__(self) -> int:
        return len(self.keys)

    def png(self, i: int) -> bytes:
        """Image i as PNG bytes, with its colour profile when it has one (at DECODED_PNG_LEVEL)."""
        return encode_png(self.images[i], self.icc_profiles[i] if self.icc_profiles else None, DECODED_PNG_LEVEL)


# zlib level of the PNGs decode writes (files, and the PNG bytes in TFRecord, Parquet and tar
# outputs): level 1 writes photos several times faster than Pillow's default 6 for a few percent
# more bytes (`make photo-bench` measures both), and the decode job writes PNGs on the same two
# cores as its synthesis.
DECODED_PNG_LEVEL = 1

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types that are already the model's channel layout at 8 bits: grey (0), RGB (2).
_PNG_DIRECT = {1: 0, 3: 2}


def png_header(data: bytes) -> Optional[tuple]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, or None if not a PNG."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data[24], data[25]


def _png_chunks(data: bytes) -> dict:
    """The chunks before a PNG's image data (where acTL and iCCP must be): kind -> first payload."""
    chunks, offset = {}, 8
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            break
        chunks.setdefault(kind, data[offset + 8:offset + 8 + length])
        offset += 12 + length
    return chunks


def _png_frames(chunks: dict) -> int:
    """Frames of an animated PNG (its acTL chunk), else 1."""
    actl = chunks.get(b"acTL", b"")
    return struct.unpack(">I", actl[:4])[0] if len(actl) >= 4 else 1


def _load_png(data: bytes, height: int, width: int, chunks: Optional[dict] = None) -> np.ndarray:
    """An 8-bit grey or RGB PNG through libspng, checked against its header's size, or BadImage."""
    frames = _png_frames(_png_chunks(data) if chunks is None else chunks)
    if frames > 1:  # libspng reads the default image alone
        raise _animated("PNG", frames)
    try:
        pixels = pyspng.load(data)
    except Exception as e:  # libspng reports every decoding failure as RuntimeError
        raise BadImage("undecodable", f"truncated or corrupt image data: {e}") from None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        raise BadImage("undecodable", f"PNG decoded to {pixels.dtype} {pixels.shape}, not its header's shape")
    return pixels


def _one_picture(img: Image.Image) -> None:
    """An animation or a multi-page file is a BadImage: one picture per image is stored, and
    keeping only the first frame would lose the rest without a word. A camera's MPO JPEG (the
    photo plus embedded previews or depth maps) is its first picture, as every viewer shows it."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1 and img.format != "MPO":
        raise _animated(img.format, frames)


def _animated(kind: str, frames: int) -> BadImage:
    return BadImage("animated", f"{kind} image with {frames} frames or pages; one picture per image is stored "
                                "(split the frames into images first)")


def _open(data: bytes):
    """Pillow's image over the bytes, its header read, or BadImage. Pillow itself refuses a header
    of more than twice its `MAX_IMAGE_PIXELS` (about 358 Mpx) before the caller's own limit is
    asked: that is the same decompression bomb, and reads so."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too_many_pixels", _reason(e)) from None
    except Exception as e:  # Pillow raises several types for unreadable bytes
        raise BadImage("undecodable", f"not a readable image: {_reason(e)}") from None


def decode_image(data: bytes, shape: tuple, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array of exactly `shape` (H, W, C), or BadImage.

    8-bit grey or RGB PNGs matching the model's channels, the common case, go through
    libspng (pyspng, about 3x faster than Pillow on MNIST digits); every other image
    (JPEG, palette, 16-bit, alpha, any mismatch) goes through Pillow and its checks.
    """
    height, width, channels = shape
    header = png_header(data)
    if header is not None:
        png_width, png_height, depth, colour = header
        if png_width * png_height > max_pixels:
            raise BadImage("too_many_pixels", f"{png_width}x{png_height} exceeds the {max_pixels}-pixel limit")
        if depth == 8 and colour == _PNG_DIRECT.get(channels) and (png_height, png_width) == (height, width):
            return _load_png(data, height, width).reshape(height, width, channels)
    img = _open(data)
    # The header is enough to refuse decompression bombs before decoding any pixels.
    if img.width * img.height > max_pixels:
        raise BadImage("too_many_pixels", f"{img.width}x{img.height} exceeds the {max_pixels}-pixel limit")
    if (img.height, img.width) != (height, width):
        raise BadImage("wrong_size", f"image is {img.width}x{img.height}, the model takes {width}x{height}")
    _one_picture(img)
    try:
        img.load()
    except Exception as e:
        raise BadImage("undecodable", f"truncated or corrupt image data: {e}") from None
    return _to_channels(img, channels)


@dataclasses.dataclass
class Photo:
    """A decoded image of any size, as the photo codec takes it."""

    pixels: np.ndarray  # uint8 (H, W, 1) or (H, W, 3)
    mode: str  # the source's pixel mode (Pillow's name) before conversion: "RGB", "L", "CMYK", "I;16", ...
    orientation: int = 1  # the EXIF orientation that was applied (1: none)
    icc: Optional[bytes] = None  # the embedded ICC colour profile the pixels are in (None: sRGB)


# Modes converted to RGB by Pillow's own conversion (recorded per row as the source mode).
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _reason(e: Exception) -> str:
    """Pillow's message without the object addresses it names (`<_io.BytesIO object at 0x7f…>`):
    a dead letter must read the same whichever process or runner wrote it."""
    import re

    return re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "the bytes", str(e)) or type(e).__name__


def decode_photo(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Photo:
    """PNG/JPEG/WebP/... bytes of any size -> 8-bit grey or RGB pixels as a viewer shows them.

    EXIF orientation is applied; palettes are expanded (grey palettes to one channel); CMYK
    and other colour spaces become RGB (a CMYK image's own ICC profile through littleCMS, to
    sRGB); 16-bit grey becomes 8-bit (the top byte); an alpha channel is dropped only when
    every pixel is opaque. An embedded ICC profile of grey or RGB pixels is kept (`icc`), for
    the decoded image to carry it again: the pixels are coded as they are, in that colour
    space. What cannot be stored faithfully is a BadImage: float and 32-bit integer images
    (`wrong_mode`), transparency (`transparent`), animations and multi-page files (`animated`).
    """
    header = png_header(data)
    if header is not None:
        width, height, depth, colour = header
        if width * height > max_pixels:
            raise BadImage("too_many_pixels", f"{width}x{height} exceeds the {max_pixels}-pixel limit")
        chunks = _png_chunks(data)
        if depth == 8 and colour in (0, 2) and b"iCCP" not in chunks:  # a profile: Pillow reads it
            return Photo(_load_png(data, height, width, chunks).reshape(height, width, -1),
                         "L" if colour == 0 else "RGB")
    img = _open(data)
    if img.width * img.height > max_pixels:
        raise BadImage("too_many_pixels", f"{img.width}x{img.height} exceeds the {max_pixels}-pixel limit")
    _one_picture(img)
    if img.mode == "I" and img.format != "PNG":  # PNG's "I" is 16-bit grey (older Pillows); elsewhere 32-bit
        raise BadImage("wrong_mode", f"32-bit integer {img.format} image: no 8-bit reading of it is "
                                     "canonical (convert it to 8 or 16 bits first)")
    try:
        img.load()
        orientation = int(img.getexif().get(0x0112, 1) or 1)
        if orientation != 1:
            from PIL import ImageOps
            img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("undecodable", f"truncated or corrupt image data: {e}") from None
    mode = source_mode = img.mode
    icc = img.info.get("icc_profile") or None
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise BadImage("transparent", f"{source_mode} image with transparent pixels; the codec stores no "
                                          "alpha channel (flatten it onto a background first)")
        img = img.convert("L" if mode.startswith("L") else "RGB")
        mode = img.mode
    if mode in _SIXTEEN_BIT:
        wide = np.asarray(img, dtype=np.int64)
        arr = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Photo(arr[..., None], source_mode, orientation, profile_for(icc, 1))
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode in _TO_RGB:
        img, mode, icc = _to_srgb(img, icc), "RGB", None
    if mode not in ("L", "RGB"):
        raise BadImage("wrong_mode", f"{source_mode} images cannot be stored (8-bit grey or colour only)")
    arr = np.asarray(img, dtype=np.uint8)
    if mode == "RGB" and source_mode == "P" and np.array_equal(arr[..., 0], arr[..., 1]) \
            and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., :1]
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    return Photo(arr, source_mode, orientation, profile_for(icc, arr.shape[-1]))


def profile_for(icc: Optional[bytes], channels: int) -> Optional[bytes]:
    """The ICC profile to keep with pixels of `channels`: one whose header says it describes such
    pixels (colour space GRAY for 1 channel, RGB for 3), else none (a grey palette's RGB profile,
    or bytes that are no profile, would make the decoded file wrong)."""
    wanted = {1: b"GRAY", 3: b"RGB "}[channels]
    return icc if icc and len(icc) >= 128 and icc[16:20] == wanted and icc[36:40] == b"acsp" else None


def _to_srgb(img: Image.Image, icc: Optional[bytes]) -> Image.Image:
    """A CMYK (or Lab, HSV, YCbCr) image as RGB: through its own ICC profile to sRGB when it has
    a usable one (littleCMS, in Pillow), else by Pillow's plain conversion."""
    if icc and img.mode == "CMYK":
        from PIL import ImageCms
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a damaged or non-CMYK profile: the plain conversion, as for no profile
    return img.convert("RGB")


def _to_channels(img: Image.Image, channels: int) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        # A palette is a lossless indirection; expand it, then apply the same rules.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB" and channels == 1:
            arr = np.asarray(img)
            if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
                return arr[..., :1].copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise BadImage("wrong_mode", f"{mode} images (16-bit or float) are not 8-bit; convert them first")
    wanted = {1: "L", 3: "RGB"}.get(channels)
    if mode != wanted:
        raise BadImage("wrong_channels", f"image mode is {mode}, the model takes {wanted} ({channels} channel(s))")
    arr = np.asarray(img, dtype=np.uint8)
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def check_pixels(pixels: np.ndarray, shape: tuple) -> np.ndarray:
    """An array from a numeric format -> uint8 (H, W, C), or BadImage."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise BadImage("wrong_dtype", f"pixel array has dtype {arr.dtype}, expected uint8")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape != tuple(shape):
        raise BadImage("wrong_size", f"image has shape {arr.shape}, the model takes {tuple(shape)}")
    return arr


def encode_png(image: np.ndarray, icc: Optional[bytes] = None, level: int = 6) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (Pillow's real codec, zlib `level`), with an ICC profile (iCCP)
    if given."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG", compress_level=level, **({"icc_profile": icc} if icc else {}))
    return out.getvalue()


def batch_records(records: Iterable[SourceRecord], shape: tuple, batch_size: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode records into ImageBatches of up to `batch_size`, yielding DeadLetters for bad ones.

    With a `shape`, every image must have it (a fixed-shape model); yields in input order.
    With `shape=None` images of any size are taken and grouped by shape (see `batch_photos`).
    """
    if shape is None:
        yield from batch_photos(records, batch_size, max_pixels)
        return
    images = np.empty((batch_size,) + tuple(shape), np.uint8)
    labels = np.full(batch_size, -1, np.int64)
    has_label = np.zeros(batch_size, bool)
    keys, extras = [], []
    for rec in records:
        try:
            if rec.error is not None:
                raise rec.error
            if rec.pixels is not None:
                pixels = check_pixels(rec.pixels, shape)
            elif rec.encoded is not None:
                pixels = decode_image(rec.encoded, shape, max_pixels)
            else:
                raise BadImage("missing_image", "record has no image")
        except BadImage as e:
            yield DeadLetter(rec.key, rec.source, rec.index, e.reason, str(e))
            continue
        n = len(keys)
        images[n] = pixels
        labels[n] = -1 if rec.label is None else rec.label
        has_label[n] = rec.label is not None
        keys.append(rec.key)
        extras.append(rec.extra)
        if len(keys) == batch_size:
            yield ImageBatch(keys, images, labels, has_label, extras=_extras(extras))
            images = np.empty_like(images)
            labels = np.full(batch_size, -1, np.int64)
            has_label = np.zeros(batch_size, bool)
            keys, extras = [], []
    if keys:
        n = len(keys)
        yield ImageBatch(keys, images[:n].copy(), labels[:n].copy(), has_label[:n].copy(), extras=_extras(extras))


def _extras(values: list) -> Optional[list]:
    return None if all(v is None for v in values) else values


# A batch of photos holds at most this many pixels (a few hundred MB of activations in the model).
BATCH_PIXELS = 4 * 1024 * 1024
# Images waiting for a batch of their shape, in all shapes together, hold at most about this many.
PENDING_PIXELS = 2 * BATCH_PIXELS


def photo_pixels(rec: SourceRecord, max_pixels: int = DEFAULT_MAX_PIXELS) -> Photo:
    """A record of any size -> Photo, or BadImage."""
    if rec.error is not None:
        raise rec.error
    if rec.pixels is not None:
        arr = np.asarray(rec.pixels)
        if arr.dtype != np.uint8:
            raise BadImage("wrong_dtype", f"pixel array has dtype {arr.dtype}, expected uint8")
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3) or 0 in arr.shape:
            raise BadImage("wrong_channels", f"pixel array of shape {arr.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise BadImage("too_many_pixels", f"{arr.shape[1]}x{arr.shape[0]} exceeds the {max_pixels}-pixel limit")
        return Photo(arr, "L" if arr.shape[-1] == 1 else "RGB")
    if rec.encoded is None:
        raise BadImage("missing_image", "record has no image")
    return decode_photo(rec.encoded, max_pixels)


class ShapeGroups:
    """Items gathered by image shape (H, W, ...) into groups that leave whole: a group leaves once
    it holds `batch_size` items or `batch_pixels` pixels (a large image alone); when the items
    waiting in all groups together pass `pending_pixels` (images of many sizes), the fullest group
    leaves early, so memory stays bounded whatever the order of the sizes. The encode job's
    batches of photos (`batch_photos`) and the photo decoder's (`codecs.spatial`) both use it."""

    def __init__(self, batch_size: int, batch_pixels: int = BATCH_PIXELS, pending_pixels: int = PENDING_PIXELS):
        self.batch_size, self.batch_pixels, self.pending_pixels = batch_size, batch_pixels, pending_pixels
        self.groups, self.waiting = {}, 0

    def add(self, shape: tuple, item) -> list:
        """Add an item; returns the [(shape, items)] groups that leave now."""
        group = self.groups.setdefault(shape, [])
        group.append(item)
        self.waiting += shape[0] * shape[1]
        out = []
        if len(group) >= self.batch_size or len(group) * shape[0] * shape[1] >= self.batch_pixels:
            out.append(self._leave(shape))
        while self.waiting > self.pending_pixels:
            out.append(self._leave(max(self.groups, key=lambda s: len(self.groups[s]) * s[0] * s[1])))
        return out

    def rest(self) -> list:
        """Every group still waiting, [(shape, items)]."""
        return [self._leave(shape) for shape in list(self.groups)]

    def _leave(self, shape):
        items = self.groups.pop(shape)
        self.waiting -= len(items) * shape[0] * shape[1]
        return shape, items


def batch_photos(records: Iterable[SourceRecord], batch_size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_pixels: int = BATCH_PIXELS, pending_pixels: int = PENDING_PIXELS):
    """Images of any size -> ImageBatches of same-shaped images (`ShapeGroups`: at most
    `batch_size` images and `batch_pixels` pixels each, a large photo alone, at most about
    `pending_pixels` waiting), plus DeadLetters."""
    groups = ShapeGroups(batch_size, batch_pixels, pending_pixels)

    def batch(items):  # items: ((key, label, extra), photo); the record itself (its encoded bytes) is not kept
        labels, photos = [label for (_, label, _), _ in items], [photo for _, photo in items]
        has = np.array([label is not None for label in labels], bool)
        values = np.array([-1 if label is None else label for label in labels], np.int64)
        return ImageBatch([key for (key, _, _), _ in items], np.stack([p.pixels for p in photos]), values, has,
                          [p.mode for p in photos], icc_profiles=[p.icc for p in photos],
                          extras=_extras([extra for (_, _, extra), _ in items]))

    for rec in records:
        try:
            photo = photo_pixels(rec, max_pixels)
        except BadImage as e:
            yield DeadLetter(rec.key, rec.source, rec.index, e.reason, str(e))
            continue
        for _, items in groups.add(photo.pixels.shape, ((rec.key, rec.label, rec.extra), photo)):
            yield batch(items)
    for _, items in groups.rest():
        yield batch(items)


def probe_shape(rec: SourceRecord) -> tuple:
    """The (H, W, C) an image record would decode to, reading only its header."""
    if rec.pixels is not None:
        arr = np.asarray(rec.pixels)
        return tuple(arr.shape) if arr.ndim == 3 else tuple(arr.shape) + (1,)
    img = Image.open(io.BytesIO(rec.encoded))
    return (img.height, img.width, 1 if img.mode in ("L", "1") else 3)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between uint8 batches (capped at 100 dB for identical images)."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = np.mean(diff.reshape(len(a), -1) ** 2, axis=1)
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)))
