"""The latent dataset: its Parquet schema, numpy <-> Arrow batches, and its manifest.

A latent dataset is a directory of `latents-*.parquet` parts (zstd) with columns
`key` (string), `latent` (fixed-size list of int8/int16) and `label` (int64, null
when the source has none). The schema metadata under `latentpack` names the format
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
from apache_beam.io.filesystems import FileSystems

from pipeline.images import LatentpackError

METADATA_KEY = b"latentpack"
FORMAT_VERSION = 1
PART_PREFIX = "latents"
MANIFEST = "_manifest.json"
DEAD_LETTER_DIR = "dead_letter"


def schema(spec: dict) -> pa.Schema:
    """The Parquet schema of a dataset made with the model described by `spec` (codec.json)."""
    value_type = pa.int8() if spec["latent_dtype"] == "int8" else pa.int16()
    meta = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": spec["fingerprint"],
        "image_shape": spec["image_shape"],
        "latent_dim": spec["latent_dim"],
        "latent_dtype": spec["latent_dtype"],
        "quantization_bits": spec["quantization"]["bits"],
        "arch": spec["architecture"]["arch"],
    }
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("latent", pa.list_(value_type, spec["latent_dim"]), nullable=False),
        pa.field("label", pa.int64()),
    ], metadata={METADATA_KEY: json.dumps(meta).encode()})


def to_table(keys, latents: np.ndarray, labels: np.ndarray, has_label: np.ndarray, schema_: pa.Schema) -> pa.Table:
    """Build one Arrow table from a batch, without a Python loop per image."""
    flat = pa.array(np.ascontiguousarray(latents).reshape(-1))
    latent = pa.FixedSizeListArray.from_arrays(flat, latents.shape[1])
    label = pa.array(labels, pa.int64(), mask=~has_label)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), latent, label], schema=schema_)


def latents_of(table: pa.Table) -> np.ndarray:
    """The `latent` column of a table as a numpy array [N, D]."""
    column = table.column("latent").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


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
