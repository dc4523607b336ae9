"""Models and latent datasets written by earlier format versions still load and decode: version 1
(latentpack 0.1: dense models only) and version 2 (spatial and hyperprior datasets whose codes hold
little-endian words)."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from pipeline import completion, decode, encode, latents
from pipeline.artifact import read_spec
from pipeline.codec import load_codec
from pipeline.errors import LatentpackError

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v1")
V2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v2")
V3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v3")


def decoded_npz(folder) -> dict:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".npz"):
            with np.load(os.path.join(folder, name)) as npz:
                out.update(zip(npz["keys"].tolist(), npz["images"]))
    return out


def test_version_1_artifact_loads_as_a_dense_model():
    spec = read_spec(os.path.join(V1, "model"))
    assert (spec.format_version, spec.family, spec.image_shape, spec.latent_dim) == (1, "dense", (28, 28, 1), 8)
    assert spec.entropy_coded


def test_version_1_dataset_decodes_to_the_pixels_version_1_decoded(tmp_path):
    out = str(tmp_path / "npz")
    manifest = decode.run(["--input", os.path.join(V1, "dataset"), "--model-dir", os.path.join(V1, "model"),
                           "--output", out, "--output-format", "npz"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 12
    decoded = decoded_npz(out)
    expected = np.load(os.path.join(V1, "expected.npz"))
    assert sorted(decoded) == sorted(expected["keys"].tolist())
    for key, image in zip(expected["keys"].tolist(), expected["images"]):
        assert np.array_equal(decoded[key], image), key


def test_version_1_model_encodes_into_a_current_dataset_that_decodes_the_same(tmp_path):
    out = str(tmp_path / "lat")
    manifest = encode.run(["--input", os.path.join(V1, "shards", "*.tfrecord"), "--model-dir",
                           os.path.join(V1, "model"), "--output", out] + BEAM_TEST_ARGS)
    new = pq.ParquetDataset(latents.part_paths(out, manifest)).read().sort_by("key")
    assert latents.metadata_of(new.schema)["format_version"] == latents.FORMAT_VERSION == 4
    old = pq.read_table(os.path.join(V1, "dataset", "latents-00000-of-00001.parquet")).sort_by("key")
    assert latents.metadata_of(old.schema)["format_version"] == 1
    # The same latents, in shorter codes.
    codec = load_codec(os.path.join(V1, "model"))
    assert np.array_equal(codec._latents(new, new.column("key").to_pylist())[0],
                          codec._latents(old, old.column("key").to_pylist())[0])
    assert sum(map(len, new.column("code").to_pylist())) < sum(map(len, old.column("code").to_pylist())) - 12


@pytest.mark.parametrize("family", ["spatial", "hyperprior"])
def test_version_2_photo_datasets_decode_to_the_pixels_version_2_decoded(tmp_path, family):
    model = os.path.join(V2, family, "model")
    out = str(tmp_path / "npz")
    manifest = decode.run(["--input", os.path.join(V2, family, "dataset"), "--model-dir", model, "--output", out,
                           "--output-format", "npz"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 4
    decoded = decoded_npz(out)
    expected = np.load(os.path.join(V2, family, "expected.npz"))
    assert sorted(decoded) == sorted(expected["keys"].tolist()) == ["p0", "p1", "p2", "p3"]
    for key in expected["keys"].tolist():
        assert np.array_equal(decoded[key], expected[f"image_{key}"]), key
    # Encoded again today: a current dataset, other (shorter) codes, the same pixels.
    lat = str(tmp_path / "lat")
    encode.run(["--input", os.path.join(V2, "images", "*.png"), "--input-format", "images", "--model-dir", model,
                "--output", lat] + BEAM_TEST_ARGS)
    old = pq.read_table(os.path.join(V2, family, "dataset", "latents-00000-of-00001.parquet")).sort_by("key")
    new = pq.ParquetDataset(latents.part_paths(lat, completion.read_manifest(lat))).read().sort_by("key")
    assert latents.metadata_of(new.schema)["format_version"] == latents.FORMAT_VERSION
    assert sum(map(len, new.column("code").to_pylist())) < sum(map(len, old.column("code").to_pylist()))
    again = str(tmp_path / "npz2")
    decode.run(["--input", lat, "--model-dir", model, "--output", again, "--output-format", "npz"] + BEAM_TEST_ARGS)
    assert all(np.array_equal(image, decoded[key]) for key, image in decoded_npz(again).items())


@pytest.mark.parametrize("family", ["spatial", "hyperprior"])
def test_version_3_photo_datasets_without_colour_profiles_decode_to_the_pixels_version_3_decoded(tmp_path, family):
    dataset = os.path.join(V3, family, "dataset")
    part = pq.read_table(os.path.join(dataset, "latents-00000-of-00001.parquet"))
    assert latents.metadata_of(part.schema)["format_version"] == 3 and "icc_profile" not in part.column_names
    out = str(tmp_path / "png")
    manifest = decode.run(["--input", dataset, "--model-dir", os.path.join(V2, family, "model"), "--output", out]
                          + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 4
    expected = np.load(os.path.join(V3, family, "expected.npz"))
    for key in expected["keys"].tolist():
        with Image.open(os.path.join(out, key + ".png")) as image:
            assert "icc_profile" not in image.info
            assert np.array_equal(np.asarray(image), expected[f"image_{key}"]), key


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
    spec["format_version"] = 99
    json.dump(spec, open(path, "w"))
    with pytest.raises(LatentpackError, match="format_version"):
        load_codec(model)
