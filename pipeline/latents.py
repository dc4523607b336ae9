"""The latent dataset: its Parquet schema, numpy <-> Arrow batches, and its manifest.

A latent dataset is a directory of `latents-*.parquet` parts (zstd) with columns
`key` (string), then either `code` (binary: the entropy-coded latents) or `latent`
(fixed-size list of int8/int16: the integer latents), and `label` (int64, null when
the source has none). The schema metadata under `latentpack` names the format
version, the model fingerprint and the codec parameters. `_manifest.json`, written
last, lists the parts; a dataset without it is incomplete.
"""
from __future__ import annotations

import json
import posixpath
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.images import LatentpackError

METADATA_KEY = b"latentpack"
FORMAT_VERSION = 1
PART_PREFIX = "latents"
MANIFEST = "_manifest.json"
DEAD_LETTER_DIR = "dead_letter"


LATENT_FORMATS = ("code", "int")


def schema(spec: dict, latent_format: str = "int") -> pa.Schema:
    """The Parquet schema of a dataset made with the model described by `spec` (codec.json).

    `code`: one entropy-coded byte string per image; `int`: the integer latents as a list.
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": spec["fingerprint"],
        "latent_format": latent_format,
        "image_shape": spec["image_shape"],
        "latent_dim": spec["latent_dim"],
        "latent_dtype": spec["latent_dtype"],
        "quantization_bits": spec["quantization"]["bits"],
        "arch": spec["architecture"]["arch"],
    }
    if latent_format == "code":
        value = pa.field("code", pa.binary(), nullable=False)
    else:
        value_type = pa.int8() if spec["latent_dtype"] == "int8" else pa.int16()
        value = pa.field("latent", pa.list_(value_type, spec["latent_dim"]), nullable=False)
    return pa.schema([pa.field("key", pa.string(), nullable=False), value, pa.field("label", pa.int64())],
                     metadata={METADATA_KEY: json.dumps(meta).encode()})


def latent_array(latents: np.ndarray) -> pa.Array:
    """Integer latents [N, D] -> a fixed-size-list array, without a Python loop per image."""
    flat = pa.array(np.ascontiguousarray(latents).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, latents.shape[1])


def value_array(latent: np.ndarray, latent_format: str, entropy=None) -> pa.Array:
    """Integer latents -> the dataset's value column: entropy-coded bytes, or the latents."""
    if latent_format == "code":
        return pa.array(entropy.encode(latent), pa.binary())
    return latent_array(latent)


def table_latents(table, entropy=None) -> np.ndarray:
    """The integer latents [N, D] of a table or record batch, from its `code` or `latent` column."""
    if "code" in table.column_names:
        return entropy.decode(table.column("code").to_pylist())
    return latents_of(table)


def to_table(keys, values: pa.Array, labels: np.ndarray, has_label: np.ndarray, schema_: pa.Schema) -> pa.Table:
    """One Arrow table from a batch: keys, the latent or code column, labels (null where absent)."""
    label = pa.array(labels, pa.int64(), mask=~has_label)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), values, label], schema=schema_)


def latents_of(table) -> np.ndarray:
    """The `latent` column of a table or record batch as a numpy array [N, D]."""
    column = table.column("latent")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


ROW_GROUP_ROWS = 65536


def writer_options(latent_format: str) -> dict:
    """Parquet encodings per column. Codes are incompressible bytes: store their lengths as
    deltas instead of a 4-byte prefix each, and keys with shared-prefix (delta) encoding."""
    if latent_format == "code":
        return {"compression": "zstd", "use_dictionary": ["label"],
                "column_encoding": {"key": "DELTA_BYTE_ARRAY", "code": "DELTA_LENGTH_BYTE_ARRAY"}}
    return {"compression": "zstd"}


class LatentParquetSink(filebasedsink.FileBasedSink):
    """Beam file sink for Arrow tables of one dataset: temp files, then an atomic rename at
    finalize. Tables are gathered into row groups of ROW_GROUP_ROWS rows."""

    def __init__(self, file_path_prefix: str, schema_: pa.Schema, latent_format: str, num_shards: int = 0):
        super().__init__(file_path_prefix, coder=None, file_name_suffix=".parquet",
                         num_shards=num_shards, mime_type="application/x-parquet",
                         # Parquet compresses per column chunk, not the whole file.
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self.schema, self.latent_format = schema_, latent_format

    def open(self, temp_path):
        handle = super().open(temp_path)
        return {"handle": handle, "writer": pq.ParquetWriter(handle, self.schema, **writer_options(self.latent_format)),
                "pending": [], "rows": 0}

    def write_record(self, state, table):
        state["pending"].append(table)
        state["rows"] += table.num_rows
        if state["rows"] >= ROW_GROUP_ROWS:
            self._flush(state)

    def _flush(self, state):
        if state["pending"]:
            # Sorted keys share prefixes, which the key column's delta encoding turns into bytes saved.
            table = pa.concat_tables(state["pending"]).sort_by("key")
            state["writer"].write_table(table, row_group_size=ROW_GROUP_ROWS)
        state["pending"], state["rows"] = [], 0

    def close(self, state):
        self._flush(state)
        state["writer"].close()
        state["handle"].close()


def metadata_of(schema_: pa.Schema) -> dict:
    raw = (schema_.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise LatentpackError("not a latentpack dataset: the Parquet schema has no latentpack metadata")
    return json.loads(raw)


def read_manifest(dataset_dir: str) -> dict:
    path = posixpath.join(dataset_dir, MANIFEST)
    if not FileSystems.exists(path):
        raise LatentpackError(
            f"{dataset_dir} is not a complete latent dataset: {MANIFEST} is missing "
            "(the encode job did not finish, or this is not a latentpack dataset)")
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def part_paths(dataset_dir: str, manifest: dict) -> list:
    return [posixpath.join(dataset_dir, part["name"]) for part in manifest["files"]]


def describe_parts(paths) -> list:
    """Name, bytes and rows of each written part, from file sizes and Parquet footers."""
    parts = []
    for path in sorted(paths):
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        with FileSystems.open(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        parts.append({"name": posixpath.basename(path), "bytes": size, "rows": rows})
    return parts


def write_json(path: str, payload: dict) -> None:
    """Write JSON through a temporary name and a rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True).encode())
    FileSystems.rename([tmp], [path])


def manifest(parts: list, counts: dict, model_fingerprint: str, extra: Optional[dict] = None) -> dict:
    return dict({
        "format": "latentpack-dataset",
        "format_version": FORMAT_VERSION,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_fingerprint": model_fingerprint,
        "images": sum(p["rows"] for p in parts),
        "total_bytes": sum(p["bytes"] for p in parts),
        "files": parts,
        "counts": counts,
        "dead_letters": counts.get("dead_lettered", 0),
    }, **(extra or {}))
