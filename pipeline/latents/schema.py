"""The latent dataset's rows: the Parquet schema of a part, Arrow tables of rows, and the codec
facts each part's metadata carries.

A part's columns are `key` (string), then the model family's columns (`code`, binary: the
entropy-coded latents, or `latent`: the integer latents; photo families add `height`, `width`,
`channels`, `mode`, `icc_profile`), and `label` (int64, null when the source has none). The
schema metadata under `latentpack` names the format version, the model fingerprint and the codec
parameters. The family's columns and facts come from its codec (`pipeline.codec.schema_of`),
passed in: this package never imports a codec.
"""
from __future__ import annotations

import json
from typing import List

import numpy as np
import pyarrow as pa

from pipeline.errors import LatentpackError

METADATA_KEY = b"latentpack"
# 2: the codec family decides the value columns (spatial rows add height, width, channels, mode).
# 3: codes are big-endian words with a shorter final state (`entropy.finish`), ~1.6 bytes fewer.
# 4: photo rows add `icc_profile` (the source's colour profile; older readers would drop it).
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# Columns that datasets of earlier versions lack (their readers take them as null).
COLUMN_SINCE = {"icc_profile": 4}
PART_PREFIX = "latents"
LATENT_FORMATS = ("code", "int")
# The extra columns of the inputs that are not tables (`Reader.extra_fields`), which the matching
# decoded outputs write back: a WebDataset sample's other files {extension: bytes}, and a
# TFRecord Example's other features as one serialized tf.train.Example.
MEMBERS, FEATURES = "members", "features"


def schema(columns: List[pa.Field], codec_metadata: dict, fingerprint: str, latent_format: str,
           extra: List[pa.Field] = (), held=None) -> pa.Schema:
    """The Parquet schema of a part: `key`, the codec's value `columns`, `label`, then the source's
    other columns (`extra`, as the input had them; one whose name is taken is stored as
    `source_<name>`), or only those whose source names are in `held` (named as among all of
    `extra`); the codec's facts, the model fingerprint, the format version, the latent format and
    the extra columns' names in the metadata."""
    fields = [pa.field("key", pa.string(), nullable=False)] + list(columns) + [pa.field("label", pa.int64())]
    taken = {f.name for f in fields}
    stored = []
    for field in extra:
        name = field.name
        while name in taken:
            name = f"source_{name}"
        taken.add(name)
        if held is None or field.name in held:
            stored.append({"name": name, "source": field.name})
            fields.append(pa.field(name, field.type))  # nullable: an input file may lack the column
    meta = dict(codec_metadata, format_version=FORMAT_VERSION, model_fingerprint=fingerprint,
                latent_format=latent_format)
    if stored:
        meta["extra_columns"] = stored
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def extra_names(schema_: pa.Schema) -> List[str]:
    """The names of a part's extra columns (the source's other columns), in order; [] if none."""
    raw = (schema_.metadata or {}).get(METADATA_KEY)
    return [e["name"] for e in json.loads(raw).get("extra_columns", [])] if raw else []


def to_table(keys, columns: dict, labels: np.ndarray, has_label: np.ndarray, schema_: pa.Schema,
             extras: list = None) -> pa.Table:
    """One Arrow table from a batch: keys, the codec's value columns, labels (null where absent),
    and the extra columns' values (`extras`: a tuple per row, or None: all null)."""
    label = pa.array(labels, pa.int64(), mask=~has_label)
    names = extra_names(schema_)
    arrays = [pa.array(keys, pa.string())] + [columns[f.name] for f in schema_
                                              if f.name not in ("key", "label") and f.name not in names]
    arrays.append(label)
    for i, name in enumerate(names):
        values = [None if row is None else row[i] for row in extras] if extras else [None] * len(keys)
        arrays.append(pa.array(values, schema_.field(name).type))
    return pa.Table.from_arrays(arrays, schema=schema_)


def latents_of(table) -> np.ndarray:
    """The `latent` column of a dense model's table or record batch as a numpy array [N, D]
    (the integer latents, usable as features)."""
    column = table.column("latent")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def metadata_of(schema_: pa.Schema) -> dict:
    raw = (schema_.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise LatentpackError("not a latentpack dataset: the Parquet schema has no latentpack metadata")
    return json.loads(raw)
