"""The latent dataset's manifest (`_manifest.json`, written last: without it a dataset is incomplete)."""
from __future__ import annotations

import time
from typing import Optional

from pipeline.completion import MANIFEST, read_manifest  # noqa: F401  (the dataset's completion marker)
from pipeline.latents.schema import FORMAT_VERSION


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
