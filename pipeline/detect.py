"""`--input-format` left out: the format told from the files themselves (magic bytes, the TFRecord
framing's checksum, the folder's TFDS or Hugging Face files), and a Hugging Face `save_to_disk`
folder given as `--input` (its listed `.arrow` files, each required to be there).

    from pipeline.detect import resolve_input
    input_format, pattern = resolve_input("photos/**/*.png", None)   # -> ("images", "photos/**/*.png")
"""
from __future__ import annotations

import copy
import gzip
import json
import posixpath
import struct
from typing import List, Optional, Tuple

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import LatentpackError

SAMPLE = 16  # files looked at


def _head(path: str, n: int = 512) -> bytes:
    try:
        with FileSystems.open(path) as f:
            return f.read(n)
    except Exception:  # unreadable: the reader's own dead letter says why
        return b""


def _is_tfrecord(head: bytes) -> bool:
    from pipeline.tfrecord import masked_crc

    if len(head) < 12:
        return False
    (length,), (crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:12])
    return masked_crc(head[:8]) == crc and length > 0


def kind_of(path: str) -> Optional[str]:
    """The input format one file belongs to, or None when its bytes do not say."""
    name = posixpath.basename(path).lower()
    head = _head(path)
    if head.startswith(b"\x1f\x8b") and "idx" in name:
        try:
            with FileSystems.open(path) as f:
                head = gzip.GzipFile(fileobj=f).read(16)
        except Exception:
            return None
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff") or head[:4] in (b"GIF8", b"II*\0", b"MM\0*") \
            or head.startswith(b"BM") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "images"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") and name.endswith(".npz"):
        return "npz"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "webdataset"
    if head[:3] == b"\0\0\x08" and "idx" in name:
        return "idx"
    if name.endswith(".arrow") or head[:4] == b"\xff\xff\xff\xff":  # an Arrow IPC stream (Hugging Face)
        return "huggingface"
    if _is_tfrecord(head):
        folder = posixpath.dirname(path)
        return "tfds" if FileSystems.exists(posixpath.join(folder, "features.json")) else "tfrecord"
    return None


def save_to_disk_files(folder: str) -> Optional[List[str]]:
    """The `.arrow` files a Hugging Face `save_to_disk` folder lists (state.json), each required to
    be there; None when `folder` is not one."""
    state = posixpath.join(folder, "state.json")
    if not FileSystems.exists(state):
        return None
    try:
        with FileSystems.open(state) as f:
            listed = [d["filename"] for d in json.loads(f.read())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise LatentpackError(f"{state}: not a Hugging Face save_to_disk state file ({e})") from None
    paths = []
    for name in listed:
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise LatentpackError(f"{state} lists {name!r}, which is not a file inside {folder}")
        path = posixpath.join(folder, name)
        if not FileSystems.exists(path):
            raise LatentpackError(f"{folder}: {name} is listed in state.json but missing; the dataset is incomplete "
                                  "(encoding the rest would lose its images silently)")
        paths.append(path)
    return paths


def _is_folder(path: str) -> bool:
    import os

    return "://" not in path and os.path.isdir(path)


def resolve_input(pattern: Optional[str], input_format: Optional[str]) -> Tuple[str, Optional[str]]:
    """(input format, pattern): a `save_to_disk` folder becomes the pattern of its listed files
    (all checked to be there); a format left out is detected from up to SAMPLE matched files, which
    must agree (else one error naming what was found and the flag to pass)."""
    from pipeline.formats import NOT_UTF8, READERS, get_reader

    if pattern and _is_folder(pattern.rstrip("/")) and input_format in (None, "huggingface"):
        folder = pattern.rstrip("/")
        files = save_to_disk_files(folder)
        if files is not None:
            arrow = posixpath.join(folder, "*.arrow")
            present = {m.path for m in FileSystems.match([arrow])[0].metadata_list}
            extra = sorted(present - set(files))
            if extra:
                raise LatentpackError(f"{folder} holds {posixpath.basename(extra[0])}, which its state.json does not "
                                      f"list: give a glob of the files to encode instead of the folder")
            return "huggingface", arrow
        if input_format is None:
            raise LatentpackError(f"--input {pattern} is a folder: give a glob of its files (e.g. '{folder}/**/*.png')")
    if input_format is not None:
        return input_format, pattern
    if not pattern:
        raise LatentpackError("--input is required (or --input-format mnist-sample for the embedded digits)")
    shards, _ = copy.copy(get_reader("tfrecord")).match(pattern)
    readable = [s for s in shards if not s.startswith(NOT_UTF8)]  # those are dead letters, whatever the format
    shards = readable or shards
    kinds = {}
    for path in readable[:SAMPLE]:
        kinds.setdefault(kind_of(path), []).append(path)
    known = {k: v for k, v in kinds.items() if k is not None}
    if len(known) == 1 and None not in kinds:
        return next(iter(known)), pattern
    names = ", ".join(sorted(READERS))
    if not known:
        raise LatentpackError(f"cannot tell the format of --input {pattern!r} from its files (e.g. {shards[0]}): "
                              f"pass --input-format ({names})")
    found = "; ".join(f"{k or 'unknown'}: {posixpath.basename(v[0])}" for k, v in sorted(kinds.items(), key=str))
    raise LatentpackError(f"--input {pattern!r} mixes formats ({found}): narrow the glob, or pass --input-format")
