"""The latent dataset's manifest (`_manifest.json`, written last: without it a dataset is incomplete)."""
from __future__ import annotations

import time
from typing import Optional

from pipeline.completion import MANIFEST, read_manifest  # noqa: F401  (the dataset's completion marker)
from pipeline.latents.schema import FORMAT_VERSION, PART_PREFIX, READABLE_VERSIONS


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


def inconsistencies(manifest: dict) -> list:
    """What a (sealed, so possibly resealed by hand) manifest says that cannot be so: a format
    version this latentpack cannot read, or an image count other than its parts' rows."""
    found = []
    version = manifest.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        found.append(f"the manifest's format_version {version!r} is not one this latentpack reads "
                     f"({', '.join(map(str, READABLE_VERSIONS))}): written by a newer latentpack?")
    files = manifest.get("files") if isinstance(manifest.get("files"), list) else []
    counted = [f.get("rows") for f in files if isinstance(f, dict)]
    rows = sum(counted) if all(isinstance(r, int) for r in counted) else None  # None: entries without rows
    if rows is not None and manifest.get("images") != rows:
        found.append(f"the manifest says {manifest.get('images')} images, its parts' entries {rows} rows")
    return found


def unlisted_parts(dataset_dir: str, manifest: dict) -> list:
    """Part files in the dataset folder that the manifest does not list (added by hand, or left by
    another job): nothing reads them, so they are reported, never silently taken in."""
    import posixpath

    from apache_beam.io.filesystems import FileSystems

    listed = {f.get("name") for f in manifest.get("files", []) if isinstance(f, dict)}
    found = FileSystems.match([posixpath.join(dataset_dir, f"{PART_PREFIX}*.parquet")])[0].metadata_list
    return sorted(m.path for m in found if posixpath.basename(m.path) not in listed)
