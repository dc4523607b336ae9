"""Training data: images read through the pipeline's own format readers, into memory."""
from __future__ import annotations

import itertools
import logging
from typing import Optional, Tuple

import numpy as np

from pipeline.formats import get_reader
from pipeline.images import DeadLetter, LatentpackError, batch_records, probe_shape


def _records(pattern: str, input_format: str):
    reader = get_reader(input_format)
    shards, root = reader.match(pattern)
    for shard in shards:
        yield from reader.records(shard, root)


def load_images(pattern: Optional[str], input_format: str,
                limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, int]:
    """(uint8 images [N,H,W,C], int64 labels [N] (-1 if none), dead-letter count).

    The image shape is taken from the first readable record; records of another
    shape are counted as bad and left out, never resized.
    """
    records = _records(pattern, input_format)
    if limit is not None:
        records = itertools.islice(records, limit)
    head = []
    shape = None
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
    batches, bad = [], 0
    for item in batch_records(itertools.chain(head, records), shape, batch_size=4096):
        if isinstance(item, DeadLetter):
            bad += 1
            if bad <= 5:
                logging.warning("skipping %s (%s): %s", item.key, item.reason, item.error)
        else:
            batches.append(item)
    images = np.concatenate([b.images for b in batches])
    labels = np.concatenate([b.labels for b in batches])
    return images, labels, bad
