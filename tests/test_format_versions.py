"""Models and latent datasets written by format version 1 (latentpack 0.1) still load and decode."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS
from pipeline import decode, encode, latents
from pipeline.artifact import read_spec
from pipeline.codecs import load_codec
from pipeline.errors import LatentpackError

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v1")


def test_version_1_artifact_loads_as_a_dense_model():
    spec = read_spec(os.path.join(V1, "model"))
    assert (spec.format_version, spec.family, spec.image_shape, spec.latent_dim) == (1, "dense", (28, 28, 1), 8)
    assert spec.entropy_coded


def test_version_1_dataset_decodes_to_the_pixels_version_1_decoded(tmp_path):
    out = str(tmp_path / "npz")
    manifest = decode.run(["--input", os.path.join(V1, "dataset"), "--model-dir", os.path.join(V1, "model"),
                           "--output", out, "--output-format", "npz"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 12
    decoded = {}
    for name in os.listdir(out):
        if name.endswith(".npz"):
            with np.load(os.path.join(out, name)) as npz:
                decoded.update(zip(npz["keys"].tolist(), npz["images"]))
    expected = np.load(os.path.join(V1, "expected.npz"))
    assert sorted(decoded) == sorted(expected["keys"].tolist())
    for key, image in zip(expected["keys"].tolist(), expected["images"]):
        assert np.array_equal(decoded[key], image), key


def test_version_1_model_encodes_into_a_version_2_dataset_with_the_same_codes(tmp_path):
    out = str(tmp_path / "lat")
    manifest = encode.run(["--input", os.path.join(V1, "shards", "*.tfrecord"), "--model-dir",
                           os.path.join(V1, "model"), "--output", out] + BEAM_TEST_ARGS)
    new = pq.ParquetDataset(latents.part_paths(out, manifest)).read().sort_by("key")
    assert latents.metadata_of(new.schema)["format_version"] == 2
    old = pq.read_table(os.path.join(V1, "dataset", "latents-00000-of-00001.parquet")).sort_by("key")
    assert latents.metadata_of(old.schema)["format_version"] == 1
    assert new.column("code").to_pylist() == old.column("code").to_pylist()


def test_a_future_dataset_version_is_refused(tmp_path):
    dataset = str(tmp_path / "ds")
    shutil.copytree(os.path.join(V1, "dataset"), dataset)
    part = os.path.join(dataset, "latents-00000-of-00001.parquet")
    table = pq.read_table(part)
    meta = latents.metadata_of(table.schema)
    meta["format_version"] = 99
    pq.write_table(table.replace_schema_metadata({latents.METADATA_KEY: json.dumps(meta).encode()}), part)
    manifest_path = os.path.join(dataset, "_manifest.json")
    manifest = json.load(open(manifest_path))  # version 1 manifests carry sizes, not checksums or a seal
    manifest["files"][0]["bytes"] = os.path.getsize(part)
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(LatentpackError, match="version 99"):
        decode.run(["--input", dataset, "--model-dir", os.path.join(V1, "model"), "--output",
                    str(tmp_path / "out")] + BEAM_TEST_ARGS)


def test_a_future_artifact_version_is_refused(tmp_path):
    model = str(tmp_path / "m")
    shutil.copytree(os.path.join(V1, "model"), model)
    path = os.path.join(model, "codec.json")
    spec = json.load(open(path))
    spec["format_version"] = 3
    json.dump(spec, open(path, "w"))
    with pytest.raises(LatentpackError, match="format_version"):
        load_codec(model)
