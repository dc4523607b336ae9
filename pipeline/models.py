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
from typing import Dict, Optional, Tuple

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


RETIRED = "retired"  # models/retired/<prefix><quality>-<release>/: what earlier releases shipped


def retired() -> Dict[str, str]:
    """{"photo:6 of 0.5.0": artifact folder} for the models that earlier releases shipped under a
    name that now names a better model: kept (models/retired/) so that their datasets still
    decode with this installation. They are never picked by name for encoding."""
    try:
        import models
    except ImportError:
        return {}
    root = os.path.join(os.path.dirname(models.__file__), RETIRED)
    found = {}
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        m = re.fullmatch(r"(\w+)-q(\d)-(\d+\.\d+\.\d+)", entry)
        if m and os.path.exists(os.path.join(root, entry, "codec.json")):
            found[f"{m.group(1)}:{m.group(2)} of {m.group(3)}"] = os.path.join(root, entry)
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
    """The name of the model this installation ships with this fingerprint (as its codec.json
    records it; loading it verifies every file), or None. Retired models are not counted."""
    found = find(fingerprint)
    return found[0] if found and found[1] == shipped().get(found[0]) else None


def find(fingerprint: str) -> Optional[Tuple[str, str]]:
    """(name, folder) of the shipped or retired model with this fingerprint, or None: the model
    that encoded a dataset, found without being named. A retired model's name says its release
    ("photo:6 of 0.5.0")."""
    for name, folder in list(shipped().items()) + list(retired().items()):
        try:
            with open(os.path.join(folder, "codec.json")) as f:
                if json.load(f).get("fingerprint") == fingerprint:
                    return name, folder
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


EMBEDDED = "_model"  # a dataset's own copy of a model that is not shipped


def embed(model_dir: str, output: str, fingerprint: str) -> int:
    """Copy the artifact at `model_dir` into `<output>/_model/` (once: a copy already there with the
    same fingerprint is kept; another one is replaced), so that the dataset decodes without the
    model's folder. Files are written whole under temporary names, then renamed. Returns the
    bytes of the copy."""
    import posixpath
    import shutil

    from apache_beam.io.filesystems import FileSystems

    from pipeline.artifact import read_spec
    from pipeline.completion import commit

    target = posixpath.join(output, EMBEDDED)
    if FileSystems.exists(posixpath.join(target, "codec.json")):
        try:
            if read_spec(target).fingerprint == fingerprint:
                return _size(target)
        except LatentpackError:
            pass  # damaged: replaced below
        FileSystems.delete([target])
    for folder, _, files in os.walk(model_dir):
        rel = os.path.relpath(folder, model_dir)
        for name in files:
            dest = posixpath.join(target, *([] if rel == "." else rel.split(os.sep)), name)
            if not FileSystems.exists(posixpath.dirname(dest)):
                FileSystems.mkdirs(posixpath.dirname(dest))
            with open(os.path.join(folder, name), "rb") as src, FileSystems.create(dest + ".tmp") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            commit(dest + ".tmp", dest)
    if read_spec(target).fingerprint != fingerprint:
        raise LatentpackError(f"{target}: the embedded copy of {model_dir} does not match its fingerprint")
    return _size(target)


def _size(folder: str) -> int:
    from apache_beam.io.filesystems import FileSystems

    import posixpath

    return sum(m.size_in_bytes for m in FileSystems.match([posixpath.join(folder, "**")])[0].metadata_list)


def embedded(dataset_dir: str) -> Optional[str]:
    """The dataset's embedded model folder, or None."""
    import posixpath

    from apache_beam.io.filesystems import FileSystems

    path = posixpath.join(dataset_dir, EMBEDDED)
    return path if FileSystems.exists(posixpath.join(path, "codec.json")) else None
