"""The photo models that ship inside the package: present, intact, pinned, and working."""
import os

import numpy as np
import pytest

from conftest import smooth_photos
from pipeline import models
from pipeline.artifact import read_spec
from pipeline.codecs import load_codec
from pipeline.errors import LatentpackError
from pipeline.images import ImageBatch

# The exact artifacts that ship. A change here means a new model: retrain it with the command in
# models/README.md, record how, and update the fingerprint together with BENCHMARKS.md.
PINNED = {
    "photo:2": "sha256:fb7e923acdfa29978ea976d133858289b0310fa252ed918a06ccd78a4b2283bc",
    "photo:4": "sha256:325ed631f85a8cb4711ebce4768ee2c3741d468100603c77b4eb0b9218a5c783",
    "photo:6": "sha256:2ede1f03526a75cc0d0466ada86e9368647068467fd5ca48a1e4970d4378fb85",
}


def test_shipped_models_are_the_pinned_ones():
    found = models.shipped()
    assert sorted(found) == sorted(PINNED)
    for name, folder in found.items():
        spec = read_spec(folder)  # verifies every file against the fingerprint
        assert spec.fingerprint == PINNED[name], name
        assert spec.family == "hyperprior" and spec.training["quality"] == int(name.split(":")[1])
        assert spec.metrics["val_psnr"] > 25


def test_shipped_models_fit_the_size_budget():
    root = os.path.dirname(os.path.abspath(models.__file__))
    folder = os.path.join(os.path.dirname(root), "models")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert total < 10 * 1024 * 1024


def test_a_shipped_model_round_trips_a_photo_and_higher_quality_costs_more_bits():
    image = smooth_photos(np.random.default_rng(7), 1, sizes=[(90, 130)])[0]
    bits, errors = [], []
    for name in sorted(PINNED):
        codec = load_codec(models.resolve(name))
        columns = codec.compress(ImageBatch(["x"], image[None], np.array([-1]), np.array([False])), "code")
        bits.append(len(columns["code"][0].as_py()) * 8)
        from pipeline import latents
        table = latents.to_table(["x"], columns, np.array([-1]), np.array([False]), latents.schema(codec.spec, "code"))
        (batch,) = list(codec.decompress(table))
        assert batch.images.shape == (1, 90, 130, 3)
        errors.append(float(np.mean((batch.images[0].astype(float) - image) ** 2)))
    assert bits == sorted(bits) and errors == sorted(errors, reverse=True)


def test_unknown_shipped_model_is_one_clear_error():
    with pytest.raises(LatentpackError, match="no shipped model 'photo:9'"):
        models.resolve("photo:9")
    assert models.resolve("some/folder") == "some/folder"
