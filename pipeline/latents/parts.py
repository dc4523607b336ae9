"""The latent dataset's parts: writing one whole, where the manifest says they are, and checking
them against it (sizes, rows, CRC32C)."""
from __future__ import annotations

import posixpath
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.completion import commit
from pipeline.errors import LatentpackError
from pipeline.latents.schema import extra_names

ROW_GROUP_ROWS = 65536
# ... or fewer when rows are large (photo codes): a row group holds at most this many bytes.
ROW_GROUP_BYTES = 64 << 20


def writer_options(schema_: pa.Schema, latent_format: str) -> dict:
    """Parquet encodings per column. Codes are incompressible bytes: store their lengths as
    deltas instead of a 4-byte prefix each, keys with shared-prefix (delta) encoding, and the
    small per-row columns (label, sizes, modes) with dictionaries. No statistics for the codes:
    their min and max would be two whole codes in the footer and in every page header (a 4 KB
    photo code twice over), and nothing filters on code bytes; nor for colour profiles (0.5-4 KB)."""
    if latent_format == "code":
        small = [f.name for f in schema_ if f.name not in ("key", "code")]
        return {"compression": "zstd", "use_dictionary": small,
                "write_statistics": [f.name for f in schema_ if f.name not in ("code", "icc_profile")],
                "column_encoding": {"key": "DELTA_BYTE_ARRAY", "code": "DELTA_LENGTH_BYTE_ARRAY"}}
    return {"compression": "zstd"}


def write_part(path: str, tables, schema_: pa.Schema, latent_format: str, metadata: Optional[dict] = None) -> int:
    """One complete part from Arrow tables: rows sorted by key (the same bytes whichever runner
    or worker order produced the tables; sorted keys share prefixes, which the key column's delta
    encoding turns into bytes saved), row groups of at most ROW_GROUP_ROWS rows or about
    ROW_GROUP_BYTES. Written under a temporary name and renamed, so a part that exists is whole
    and a retried task simply writes it again. Returns the rows written."""
    tables = [t for t in tables if t.num_rows]
    table = pa.concat_tables(tables).sort_by("key") if tables else schema_.empty_table()
    # Code parts have no nested columns, so the Parquet schema alone reads back the same Arrow
    # types: they skip the serialized Arrow schema (~0.7 KB of footer, the codec metadata in it a
    # second time) and carry the codec metadata as the file's own key-value metadata, which
    # readers show as the schema's. (A dense `int` part's fixed-size lists need the Arrow schema.)
    # (Parts that keep the source's other columns store the Arrow schema: those may be any type.)
    flat = latent_format == "code" and not extra_names(schema_)
    if flat:
        metadata = {**(schema_.metadata or {}), **(metadata or {})}
        schema_, table = schema_.remove_metadata(), table.replace_schema_metadata(None)
    tmp = path + ".tmp"
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        writer = pq.ParquetWriter(handle, schema_, store_schema=not flat, **writer_options(schema_, latent_format))
        row_bytes = max(table.nbytes // max(table.num_rows, 1), 1)
        step = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))
        for start in range(0, table.num_rows, step):
            writer.write_table(table.slice(start, step), row_group_size=step)
        if not table.num_rows:
            writer.write_table(table)
        if metadata:
            writer.add_key_value_metadata(metadata)
        writer.close()
    commit(tmp, path)
    return table.num_rows


def part_paths(dataset_dir: str, manifest: dict) -> list:
    """The dataset's part files, as the manifest lists them; a name that is not a plain file name
    inside the dataset folder (`../x`, `/abs`, `a/b`) is refused, never followed."""
    files = manifest.get("files")
    if not isinstance(files, list):
        raise LatentpackError(f"{dataset_dir}: the manifest has no list of files")
    paths = []
    for part in files:
        name = part.get("name") if isinstance(part, dict) else None
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
                or not name.endswith(".parquet"):
            raise LatentpackError(f"{dataset_dir}: the manifest lists {str(name)[:80]!r}, which is not a part file "
                                  "inside the dataset folder; refusing to follow it")
        paths.append(posixpath.join(dataset_dir, name))
    return paths


def file_crc32c(path: str) -> str:
    """CRC32C of a file's bytes (hex), read in 16 MB pieces."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            checksum.update(chunk)
    return checksum.digest().hex()


def describe_parts(paths) -> list:
    """Name, bytes, rows and CRC32C of each written part, from file sizes, Parquet footers and
    the bytes themselves: what `decode`, `inspect` and `verify` check before trusting a part."""
    parts = []
    for path in sorted(paths):
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
        with FileSystems.open(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        parts.append({"name": posixpath.basename(path), "bytes": size, "rows": rows, "crc32c": file_crc32c(path)})
    return parts


def require_intact(dataset_dir: str, paths: list, entries: list, checksums: bool) -> None:
    """Refuse a dataset whose parts differ from their manifest entries (sizes and rows; with
    `checksums`, the CRC32C of their bytes too), naming the first damaged part."""
    for path, expected in zip(paths, entries):
        problem = check_part(path, expected if checksums else {k: v for k, v in expected.items() if k != "crc32c"})
        if problem:
            raise LatentpackError(f"{path} {problem}; the dataset is damaged (latentpack verify {dataset_dir} "
                                  "lists every problem)")


def check_part(path: str, expected: dict) -> Optional[str]:
    """None if the part has the manifest's bytes, rows and checksum, else what differs."""
    try:
        size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
    except Exception as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if "bytes" in expected and size != expected["bytes"]:
        return f"has {size} bytes, the manifest says {expected['bytes']}"
    if "crc32c" in expected:
        actual = file_crc32c(path)
        if actual != expected["crc32c"]:
            return f"has CRC32C {actual}, the manifest says {expected['crc32c']} (the file was altered)"
    try:
        with FileSystems.open(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except Exception as e:
        return f"is not a readable Parquet file ({type(e).__name__}: {e})"
    if "rows" in expected and rows != expected["rows"]:
        return f"has {rows} rows, the manifest says {expected['rows']}"
    return None
