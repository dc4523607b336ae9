"""The model artifact: the contract between `training/` (writes it) and `pipeline/` (reads it).

An artifact directory holds a TensorFlow SavedModel with two signatures,
`encode` (uint8 images [N,H,W,C] -> integer latents [N,D]) and `decode` (the
reverse), plus `codec.json` describing it. The fingerprint is a SHA-256 over every
file of the directory (codec.json without its own fingerprint field included), so a
latent dataset can name exactly the model that made it.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.images import LatentpackError

CODEC_FILE = "codec.json"
FORMAT = "latentpack-codec"
FORMAT_VERSION = 1
LATENT_DTYPES = {"int8": np.int8, "int16": np.int16}

# Field -> (type(s), check) for the parts of codec.json the pipeline relies on.
_SCHEMA = {
    "format": (str, lambda v: v == FORMAT),
    "format_version": (int, lambda v: v == FORMAT_VERSION),
    "image_shape": (list, lambda v: len(v) == 3 and all(isinstance(d, int) and d > 0 for d in v) and v[2] in (1, 3)),
    "latent_dim": (int, lambda v: v > 0),
    "latent_dtype": (str, lambda v: v in LATENT_DTYPES),
    "quantization": (dict, lambda v: isinstance(v.get("bits"), int)),
    "architecture": (dict, lambda v: "arch" in v),
    "fingerprint": (str, lambda v: v.startswith("sha256:")),
}


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


def validate_spec(spec: dict, where: str) -> None:
    for field, (kind, check) in _SCHEMA.items():
        if field not in spec:
            raise LatentpackError(f"{where}: missing field {field!r}")
        if not isinstance(spec[field], kind) or not check(spec[field]):
            raise LatentpackError(f"{where}: invalid value for {field!r}: {spec[field]!r}")
    if "entropy_model" in spec:
        _validate_entropy_model(spec["entropy_model"], spec["latent_dim"], where)


def _validate_entropy_model(model, latent_dim: int, where: str) -> None:
    """Integer tables only: one per latent dimension, each summing to 2**precision."""
    def bad(why):
        return LatentpackError(f"{where}: invalid entropy_model: {why}")

    if not isinstance(model, dict) or not isinstance(model.get("precision"), int) or not 8 <= model["precision"] <= 24:
        raise bad("needs an integer 'precision' between 8 and 24")
    offsets, tables = model.get("offsets"), model.get("frequencies")
    if not isinstance(offsets, list) or not isinstance(tables, list) or not len(offsets) == len(tables) == latent_dim:
        raise bad(f"needs {latent_dim} 'offsets' and 'frequencies' tables")
    for d, (offset, table) in enumerate(zip(offsets, tables)):
        if not isinstance(offset, int) or not isinstance(table, list) or not table or len(table) > 65536:
            raise bad(f"dimension {d}: malformed table")
        if not all(isinstance(f, int) and f >= 1 for f in table) or sum(table) != 1 << model["precision"]:
            raise bad(f"dimension {d}: frequencies must be positive integers summing to 2**precision")


def read_spec(model_dir: str, verify: bool = True) -> dict:
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
    if not isinstance(spec, dict):
        raise LatentpackError(f"{path}: expected a JSON object")
    validate_spec(spec, path)
    if verify:
        actual = compute_fingerprint(model_dir)
        if actual != spec["fingerprint"]:
            raise LatentpackError(
                f"{model_dir}: the files do not match the fingerprint in {CODEC_FILE} "
                f"({spec['fingerprint'][:19]}… recorded, {actual[:19]}… found); the artifact was modified or is incomplete")
    return spec


class Codec:
    """A loaded artifact: numpy in, numpy out. Load once per worker (in DoFn.setup).

    `entropy` is the artifact's EntropyCoder (integer latents <-> codes), or None for
    models trained without a prior.
    """

    def __init__(self, model_dir: str, spec: Optional[dict] = None):
        self.model_dir = model_dir
        self.spec = spec if spec is not None else read_spec(model_dir)
        self.image_shape = tuple(self.spec["image_shape"])
        self.latent_dim = self.spec["latent_dim"]
        self.latent_dtype = LATENT_DTYPES[self.spec["latent_dtype"]]
        self.fingerprint = self.spec["fingerprint"]
        self.entropy = None
        if "entropy_model" in self.spec:
            from pipeline.entropy import EntropyCoder
            self.entropy = EntropyCoder(self.spec["entropy_model"])
        import tensorflow as tf

        # TensorFlow's own loader: no pickle, no Keras deserialization of Python code.
        self._model = tf.saved_model.load(model_dir)
        self._encode = self._model.signatures["encode"]
        self._decode = self._model.signatures["decode"]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,C] -> integer latents [N,D]."""
        if len(images) == 0:
            return np.zeros((0, self.latent_dim), self.latent_dtype)
        return self._encode(images=images)["latent"].numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """integer latents [N,D] -> uint8 [N,H,W,C]."""
        if len(latents) == 0:
            return np.zeros((0,) + self.image_shape, np.uint8)
        return self._decode(latent=np.asarray(latents, self.latent_dtype))["image"].numpy()
