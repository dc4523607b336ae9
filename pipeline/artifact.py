"""The model artifact: the contract between `training/` (writes it) and `pipeline/` (reads it).

An artifact directory holds a TensorFlow SavedModel with two signatures, `encode`
(uint8 images -> integer latents) and `decode` (the reverse), plus `codec.json`
describing it (read into a `pipeline.spec.CodecSpec`; `pipeline.codec` loads the
family's codec class). The fingerprint is a SHA-256 over every
file of the directory (codec.json without its own fingerprint field included), so a
latent dataset can name exactly the model that made it.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import LatentpackError
from pipeline.spec import FORMAT, FORMAT_VERSION, CodecSpec  # noqa: F401  (training/export.py writes them)

CODEC_FILE = "codec.json"


def _list_files(model_dir: str) -> list:
    root = model_dir.rstrip("/") + "/"
    found = FileSystems.match([root + "**"])[0].metadata_list
    return sorted(m.path[len(root):] for m in found)


def compute_fingerprint(model_dir: str) -> str:
    """SHA-256 of every file in the artifact (codec.json minus its fingerprint field)."""
    digest = hashlib.sha256()
    for rel in _list_files(model_dir):
        path = posixpath.join(model_dir, rel)
        with FileSystems.open(path) as f:
            data = f.read()
        if rel == CODEC_FILE:
            spec = json.loads(data)
            spec.pop("fingerprint", None)
            data = json.dumps(spec, sort_keys=True).encode()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return "sha256:" + digest.hexdigest()


def validate_spec(spec: dict, where: str) -> CodecSpec:
    """A parsed codec.json -> CodecSpec, or LatentpackError naming the file and the field."""
    return CodecSpec.from_dict(spec, where)


def read_spec(model_dir: str, verify: bool = True) -> CodecSpec:
    """Read and validate codec.json; with `verify`, check the fingerprint against the files."""
    path = posixpath.join(model_dir, CODEC_FILE)
    if not FileSystems.exists(path):
        raise LatentpackError(f"{model_dir} is not a latentpack model artifact: {CODEC_FILE} is missing")
    if not FileSystems.exists(posixpath.join(model_dir, "saved_model.pb")):
        raise LatentpackError(f"{model_dir} is not a latentpack model artifact: saved_model.pb is missing")
    try:
        with FileSystems.open(path) as f:
            spec = json.loads(f.read())
    except ValueError as e:
        raise LatentpackError(f"{path}: not valid JSON: {e}") from None
    spec = validate_spec(spec, path)
    if verify:
        actual = compute_fingerprint(model_dir)
        if actual != spec.fingerprint:
            raise LatentpackError(
                f"{model_dir}: the files do not match the fingerprint in {CODEC_FILE} "
                f"({spec.fingerprint[:19]}… recorded, {actual[:19]}… found); the artifact was modified or is incomplete")
    return spec
