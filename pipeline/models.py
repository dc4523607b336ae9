"""Shipped models: `--model-dir photo:<quality>` names a trained artifact inside the package.

The artifacts live in the repository's `models/` folder (package data, installed with
latentpack), one folder per model, each a normal artifact with its own fingerprint.
`latentpack encode --model-dir photo:4 ...` therefore works on a fresh install without
training anything; how each one was trained is in its codec.json and models/README.md.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

from pipeline.errors import LatentpackError

PREFIX = {"photo": "photo-q"}


def shipped() -> Dict[str, str]:
    """{name: artifact folder} for every model that ships with this installation."""
    try:
        import models
    except ImportError:
        return {}
    root = os.path.dirname(models.__file__)
    found = {}
    for entry in sorted(os.listdir(root)):
        m = re.fullmatch(r"(\w+)-q(\d)", entry)
        if m and os.path.exists(os.path.join(root, entry, "codec.json")):
            found[f"{m.group(1)}:{m.group(2)}"] = os.path.join(root, entry)
    return found


def resolve(model_dir: str) -> str:
    """A folder path as is; `photo:<quality>` -> the shipped artifact's folder."""
    if not is_shipped_name(model_dir):
        return model_dir
    available = shipped()
    if model_dir not in available:
        names = ", ".join(available) or "none in this installation"
        raise LatentpackError(f"no shipped model {model_dir!r}; shipped models: {names}")
    return available[model_dir]


def folder_name(name: str) -> str:
    """`photo:4` -> `models/photo-q4`, where the repository (and a release's package) keeps it."""
    kind, quality = name.split(":")
    return f"models/{PREFIX[kind]}{quality}"


def is_shipped_name(model_dir: str) -> bool:
    m = re.fullmatch(r"(\w+):(\d+)", model_dir or "")
    return bool(m) and m.group(1) in PREFIX


def by_fingerprint(fingerprint: str) -> Optional[str]:
    """The name of the shipped model with this fingerprint (as its codec.json records it; loading
    it verifies every file), or None."""
    for name, folder in shipped().items():
        try:
            with open(os.path.join(folder, "codec.json")) as f:
                if json.load(f).get("fingerprint") == fingerprint:
                    return name
        except (OSError, ValueError):
            continue
    return None


def package_version() -> str:
    """This installation's latentpack version, recorded in what it writes."""
    from importlib import metadata

    try:
        return metadata.version("latentpack")
    except metadata.PackageNotFoundError:
        return "unknown"
