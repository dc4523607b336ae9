import json
import os
import shutil

import numpy as np
import pytest

from pipeline.codec import load_codec
from pipeline.artifact import compute_fingerprint, read_spec
from pipeline.errors import LatentpackError
from pipeline.images import psnr
from families.dense.export import fit_quantization


def test_artifact_round_trip(model_dir, mnist):
    codec = load_codec(model_dir)
    images = mnist[0][:50]
    latent = codec.encode(images)
    assert latent.shape == (50, 16) and latent.dtype == np.int8
    recon = codec.decode(latent)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    # Deterministic: the same images give the same codes and the same pixels.
    assert np.array_equal(codec.encode(images), latent)
    assert np.array_equal(codec.decode(latent), recon)
    assert codec.encode(images[:0]).shape == (0, 16)


def test_codec_json_describes_the_artifact(model_dir):
    spec = read_spec(model_dir)
    assert spec.image_shape == (28, 28, 1) and spec.latent_dim == 16 and spec.family == "dense"
    assert spec.arch == "conv" and spec.format_version == 3
    assert spec.training["epochs"] == 4 and spec.training["seed"] == 0
    assert 5 < spec.metrics["val_psnr"] < 60
    assert spec.fingerprint == compute_fingerprint(model_dir)
    assert os.path.exists(os.path.join(model_dir, "loss.png"))


def test_quantization_fits_range_per_dimension():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(10000, 3)) * np.array([1.0, 10.0, 0.1])
    q = fit_quantization(z, bits=8)
    assert q["bits"] == 8 and len(q["low"]) == 3
    step = np.array(q["step"])
    assert np.allclose(step[1] / step[0], 10, rtol=0.1) and np.allclose(step[2] / step[0], 0.1, rtol=0.1)
    assert q["min"] == [-128] * 3 and q["max"] == [127] * 3
    # Every training value within the fitted range round-trips within half a step.
    low = np.array(q["low"])
    codes = np.clip(np.round((z - low) / step), -128, 127)
    err = np.abs(codes * step + low - z)
    inside = (z >= low - 128 * step) & (z <= low + 127 * step)
    assert (err <= step / 2 + 1e-9)[inside].all() and inside.mean() > 0.99


def test_psnr():
    a = np.zeros((2, 4, 4, 1), np.uint8)
    b = a.copy()
    b[1] = 255
    assert psnr(a, b).tolist() == [100.0, 0.0]


@pytest.fixture
def artifact_copy(model_dir, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(model_dir, path)
    return path


def test_modified_artifact_is_refused(artifact_copy):
    with open(os.path.join(artifact_copy, "variables", "variables.index"), "ab") as f:
        f.write(b"\0")
    with pytest.raises(LatentpackError, match="do not match the fingerprint"):
        read_spec(artifact_copy)


def test_missing_files_are_refused(artifact_copy):
    os.remove(os.path.join(artifact_copy, "saved_model.pb"))
    with pytest.raises(LatentpackError, match="saved_model.pb is missing"):
        read_spec(artifact_copy)
    with pytest.raises(LatentpackError, match="codec.json is missing"):
        read_spec(os.path.dirname(artifact_copy))


def test_invalid_codec_json_is_refused(artifact_copy):
    path = os.path.join(artifact_copy, "codec.json")
    spec = json.load(open(path))
    spec["image_shape"] = [28, 28, 2]
    json.dump(spec, open(path, "w"))
    with pytest.raises(LatentpackError, match="image_shape"):
        read_spec(artifact_copy)
    open(path, "w").write("{not json")
    with pytest.raises(LatentpackError, match="not valid JSON"):
        read_spec(artifact_copy)


def test_codec_json_edited_to_disagree_with_its_savedmodel_is_refused(artifact_copy):
    import json

    from pipeline.artifact import compute_fingerprint

    path = os.path.join(artifact_copy, "codec.json")
    spec = json.load(open(path))
    spec["latent_dim"] = spec["latent_dim"] * 2
    spec["architecture"]["latent_dim"] = spec["latent_dim"]
    with open(path, "w") as f:
        json.dump(spec, f)
    spec["fingerprint"] = compute_fingerprint(artifact_copy)  # a careful tamperer recomputes it
    with open(path, "w") as f:
        json.dump(spec, f)
    with pytest.raises(LatentpackError, match="does not match its SavedModel"):
        load_codec(artifact_copy)
