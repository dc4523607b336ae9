"""The scale-hyperprior family: its integer hyper-synthesis (the determinism policy), its
artifact and codes. Behaviour it shares with the spatial family (exact sizes, mixed sizes and
modes through the jobs, tiles, decoding identically in another process with oneDNN off and
one thread) is tested for both families in test_spatial.py through `photo_model_dir`."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import smooth_photos
from pipeline.artifact import compute_fingerprint, read_spec
from pipeline.codec import load_codec
from families.hyperprior.codec import ACTIVATION_LIMIT, WEIGHT_LIMIT, HyperCoder, IntegerHyperSynthesis
from pipeline.errors import LatentpackError


def _int_transpose_conv(x, kernel, stride):
    """The same operation in int64 arithmetic (numpy's integer matmul: no BLAS, no rounding)."""
    h, w, cin = x.shape
    size, cout = kernel.shape[0], kernel.shape[2]
    before = (size - stride) // 2
    out = np.zeros((stride * h + size, stride * w + size, cout), np.int64)
    for ky in range(size):
        for kx in range(size):
            out[ky:ky + stride * h:stride, kx:kx + stride * w:stride] += \
                (x.reshape(-1, cin) @ kernel[ky, kx].T.astype(np.int64)).reshape(h, w, cout)
    return out[before:before + stride * h, before:before + stride * w]


@pytest.mark.parametrize("stride,size", [(2, 5), (1, 3)])
def test_transposed_convolution_is_keras_conv2d_transpose(stride, size):
    import keras

    rng = np.random.default_rng(0)
    x = rng.integers(-8, 9, (1, 5, 7, 4)).astype(np.float32)
    layer = keras.layers.Conv2DTranspose(3, size, strides=stride, padding="same", use_bias=False)
    layer.build(x.shape)
    kernel = rng.integers(-8, 9, tuple(layer.kernel.shape)).astype(np.float32)
    layer.kernel.assign(kernel)
    expected = layer(x).numpy()[0]  # small integers: exact in float32
    got = IntegerHyperSynthesis._transpose_conv(x[0].astype(np.float64), kernel.astype(np.float64), stride)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_float64_products_are_exact_at_the_largest_allowed_values():
    """The policy's claim: at the bounds the loader enforces, float64 BLAS equals integer arithmetic."""
    rng = np.random.default_rng(1)
    kernel = rng.integers(0, WEIGHT_LIMIT + 1, (5, 5, 64, 64))  # one sign: no cancellation, largest sums
    kernel[0, 0] = WEIGHT_LIMIT  # worst case present
    x = rng.integers(0, ACTIVATION_LIMIT + 1, (6, 9, 64))
    x[0, 0] = ACTIVATION_LIMIT
    exact = _int_transpose_conv(x, kernel, 2)
    fast = IntegerHyperSynthesis._transpose_conv(x.astype(np.float64), kernel.astype(np.float64), 2)
    assert np.abs(exact).max() > 2 ** 34  # far beyond float32's exact integers (2**24)
    assert np.array_equal(fast.astype(np.int64), exact)


def test_large_grids_go_through_the_integer_network_in_strips_with_the_same_indexes(monkeypatch):
    """Strips of z rows with MARGIN rows of context give the whole grid's indexes exactly, down to
    strips of one row (what bounds the memory of a 24-megapixel photo's side information)."""
    from families.hyperprior import codec as hyperprior

    rng = np.random.default_rng(4)
    n, m = 6, 5
    layers = [{"stride": 2, "relu": True, "shift": 6}, {"stride": 2, "relu": True, "shift": 6},
              {"stride": 1, "relu": False, "index_offset": -3000, "index_step": 400}]
    kernels = [rng.integers(-60, 61, (5, 5, n, n)), rng.integers(-60, 61, (5, 5, n, n)),
               rng.integers(-60, 61, (3, 3, m, n))]
    biases = [rng.integers(-50, 50, n), rng.integers(-50, 50, n), rng.integers(-500, 500, m)]
    network = IntegerHyperSynthesis(layers, kernels, biases, 64)
    z = rng.integers(-20, 21, (13, 7, n))
    whole = network(z)
    assert whole.shape == (52, 28, m) and len(np.unique(whole)) > 10  # many tables chosen
    for positions in (16 * 7 * 4, 16 * 7, 1):  # 4 rows of z per strip, 1 row, 1 row (the floor)
        monkeypatch.setattr(hyperprior, "STRIP_POSITIONS", positions)
        assert np.array_equal(network(z), whole)


def test_artifact_is_a_hyperprior(hyperprior_model_dir):
    spec = read_spec(hyperprior_model_dir)
    assert (spec.format_version, spec.family, spec.arch, spec.stride) == (3, "hyperprior", "hyperprior", 16)
    assert (spec.latent_channels, spec.hyper_channels) == (8, 16)
    model = spec.entropy_model
    assert len(model["hyper"]["frequencies"]) == 16 and len(model["gaussian"]["frequencies"]) == 64
    assert [layer["stride"] for layer in model["hyper_synthesis"]] == [2, 2, 1]
    assert spec.metrics["val_bpp"] > 0 and spec.metrics["val_psnr"] > 5
    assert spec.training["family"] == "hyperprior" and spec.training["steps_done"] == 30


def test_the_side_information_decides_the_tables(hyperprior_model_dir):
    """A code holds z then y; the decoder recomputes the indexes from z alone, so the latents it
    returns are exactly the (clipped) latents the encoder coded."""
    codec = load_codec(hyperprior_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(5), 3, sizes=[(70, 50)]))
    latent = codec.analysis(images)
    z = codec._hyper_encode(latent=latent)["hyper"].numpy()
    assert z.shape == (3, 2, 1, 16)
    for y, side in zip(latent, z):
        code, coded = codec.coder.encode(y, side)
        assert np.array_equal(codec.coder.decode(code, *y.shape[:2]), coded)
        index = codec.coder.indexes(side.astype(np.int64), y.shape[:2])
        r = codec.coder.radius[index]
        assert np.array_equal(coded, np.clip(y, -r, r)) and np.array_equal(coded, codec.coder.clip(y, index))
        assert np.array_equal(codec.coder.clipped(y, side), coded)  # what the int format stores


def _altered_copy(model_dir, tmp_path, change):
    copy = str(tmp_path / "altered")
    shutil.copytree(model_dir, copy)
    path = os.path.join(copy, "codec.json")
    with open(path) as f:
        spec = json.load(f)
    change(spec)
    with open(path, "w") as f:
        json.dump(spec, f)
    spec["fingerprint"] = compute_fingerprint(copy)
    with open(path, "w") as f:
        json.dump(spec, f)
    return copy


@pytest.mark.parametrize("change,message", [
    (lambda s: s["entropy_model"]["hyper_synthesis"][-1].pop("index_step"), "hyper_synthesis"),
    (lambda s: s["entropy_model"]["gaussian"]["offsets"].__setitem__(0, 3), "symmetric"),
    (lambda s: (s["entropy_model"]["gaussian"]["offsets"].__setitem__(0, 0),
                s["entropy_model"]["gaussian"]["frequencies"].__setitem__(0, [65536])), "at least"),
    (lambda s: s["entropy_model"]["hyper"]["frequencies"].pop(), "tables"),
    (lambda s: s["entropy_model"]["hyper_synthesis"][0].__setitem__("kernel_shape", [3, 3, 1, 1]), "does not match"),
    (lambda s: s["entropy_model"]["hyper_synthesis"][0].__setitem__("shift", 99), "shift"),
])
def test_an_inconsistent_hyperprior_artifact_is_one_clear_error(hyperprior_model_dir, tmp_path, change, message):
    copy = _altered_copy(hyperprior_model_dir, tmp_path, change)
    with pytest.raises(LatentpackError, match=message):
        load_codec(copy)


def test_kernels_beyond_the_exact_range_are_refused(hyperprior_model_dir):
    spec = read_spec(hyperprior_model_dir)
    codec = load_codec(hyperprior_model_dir)
    kernels = [k.numpy() for k in codec._model.hyper_kernels]
    biases = [b.numpy() for b in codec._model.hyper_biases]
    kernels[1] = kernels[1].astype(np.int64) * 0 + WEIGHT_LIMIT + 1
    with pytest.raises(LatentpackError, match="exact integer range"):
        HyperCoder(spec.entropy_model, kernels, biases)


def test_train_command_builds_a_hyperprior_on_spatial_transforms(tmp_path, photo_folder, spatial_model_dir, capsys):
    from training.train import main

    out = str(tmp_path / "model")
    assert main(["--arch", "hyperprior", "--input", str(photo_folder / "*.png"), "--input-format", "images",
                 "--quality", "3", "--filters", "16", "--latent-channels", "8", "--crop", "32", "--batch-size", "2",
                 "--steps", "4", "--validate-every", "4", "--checkpoint-every", "4", "--model-dir", out,
                 "--init-from", os.path.join(os.path.dirname(spatial_model_dir), "checkpoints")]) == 0
    assert "model written to" in capsys.readouterr().out
    spec = read_spec(out)
    assert spec.family == "hyperprior" and spec.training["lmbda"] == 0.0067 and spec.training["steps_done"] == 4
    # Another quality level starts from that hyperprior run: every weight, the hyper-transforms too.
    import tensorflow as tf

    from families.hyperprior.train import HyperpriorTrainer
    from training.loop import PhotoConfig

    trainer = HyperpriorTrainer(PhotoConfig(filters=16, latent_channels=8, lmbda=0.0018, family="hyperprior"))
    latest = trainer.init_from(out + "-checkpoints")
    restored = HyperpriorTrainer(PhotoConfig(filters=16, latent_channels=8, family="hyperprior"))
    restored.checkpoint.restore(latest).assert_existing_objects_matched()
    for a, b in zip(trainer.variables, restored.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(v.path.startswith("hyper_synthesis") for v in trainer.variables)
    # A missing starting point is one clear error, not a fresh start or a traceback.
    with pytest.raises(LatentpackError, match="no training checkpoint"):
        main(["--arch", "hyperprior", "--input", str(photo_folder / "*.png"), "--input-format", "images",
              "--filters", "16", "--latent-channels", "8", "--crop", "32", "--steps", "2",
              "--model-dir", str(tmp_path / "other"), "--init-from", str(tmp_path / "nowhere")])
