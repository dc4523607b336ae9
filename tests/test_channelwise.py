"""The channelwise family: its exact integer networks (the determinism policy), its coder, its
artifact, and its start from a trained scale hyperprior. Behaviour it shares with the other photo
families (exact sizes, mixed sizes and modes through the jobs, tiles, refinement, decoding
identically in another process with oneDNN off and one thread) is tested for every family in
test_spatial.py and test_refine.py through `photo_model_dir`."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import smooth_photos
from pipeline.artifact import compute_fingerprint, read_spec
from pipeline.codec import load_codec
from pipeline.errors import LatentpackError
from pipeline.integer import ACTIVATION_LIMIT, IntegerLayer, IntegerNetwork


def _keras_output(layer_kind, x, kernel, stride):
    import keras

    cls = keras.layers.Conv2DTranspose if layer_kind == "transpose" else keras.layers.Conv2D
    layer = cls(kernel.shape[2] if layer_kind == "transpose" else kernel.shape[3], kernel.shape[0], strides=stride,
                padding="same", use_bias=False)
    layer.build((1,) + x.shape)
    layer.kernel.assign(kernel.astype(np.float32))
    return layer(x[None].astype(np.float32)).numpy()[0]


@pytest.mark.parametrize("kind,stride,size", [("conv", 1, 3), ("conv", 1, 5), ("transpose", 2, 5), ("transpose", 1, 3)])
def test_integer_layers_are_keras_convolutions(kind, stride, size):
    rng = np.random.default_rng(0)
    x = rng.integers(-8, 9, (5, 7, 4))
    shape = (size, size, 3, 4) if kind == "transpose" else (size, size, 4, 3)
    kernel = rng.integers(-8, 9, shape)
    layer = IntegerLayer({"stride": stride, "transpose": kind == "transpose"}, kernel, np.zeros(3, np.int64))
    got = layer(x.astype(np.float64))
    expected = _keras_output(kind, x, kernel, stride)  # small integers: exact in float32
    assert got.shape == expected.shape and np.array_equal(got, expected.astype(np.int64))


def test_float64_products_are_exact_at_the_largest_allowed_values():
    """At the bounds the loader admits, float64 BLAS equals integer arithmetic."""
    rng = np.random.default_rng(1)
    kernel = rng.integers(0, 128, (3, 3, 200, 16))  # one sign: no cancellation, largest sums
    x = rng.integers(0, ACTIVATION_LIMIT + 1, (6, 9, 200))
    layer = IntegerLayer({}, kernel, np.zeros(16, np.int64))
    layer.check(np.full(200, float(ACTIVATION_LIMIT)))
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    exact = sum(padded[ky:ky + 6, kx:kx + 9] @ kernel[ky, kx] for ky in range(3) for kx in range(3))
    assert np.abs(exact).max() > 2 ** 30
    assert np.array_equal(layer(x.astype(np.float64)), exact)


def test_a_network_that_could_leave_the_exact_range_is_refused():
    big = np.full((3, 3, 64, 4), 2 ** 20, np.int64)
    with pytest.raises(LatentpackError, match="exact integer range"):
        IntegerNetwork([{"shift": 0}, {}], [big, np.ones((3, 3, 4, 2), np.int64)], [np.zeros(4), np.zeros(2)],
                       np.full(64, 2.0 ** 30))  # latents at a 15-bit fixed point
    with pytest.raises(LatentpackError, match="shift"):
        IntegerNetwork([{}, {}], [np.ones((3, 3, 2, 2), np.int64)] * 2, [np.zeros(2)] * 2, np.ones(2))


def test_large_grids_go_through_an_integer_network_in_strips_with_the_same_output(monkeypatch):
    from pipeline import integer

    rng = np.random.default_rng(4)
    layers = [{"stride": 2, "transpose": True, "relu": True, "shift": 6},
              {"stride": 1, "relu": True, "shift": [5, 6, 7, 5, 6]}, {"stride": 1}]
    kernels = [rng.integers(-60, 61, (5, 5, 5, 3)), rng.integers(-60, 61, (3, 3, 5, 5)),
               rng.integers(-60, 61, (3, 3, 5, 4))]
    biases = [rng.integers(-50, 50, 5), rng.integers(-50, 50, 5), rng.integers(-500, 500, 4)]
    network = IntegerNetwork(layers, kernels, biases, np.full(3, 100.0))
    x = rng.integers(-20, 21, (13, 7, 3))
    whole = network(x)
    assert whole.shape == (26, 14, 4) and len(np.unique(whole)) > 50
    for positions in (4 * 14 * 3, 4 * 14, 1):  # 3 rows of input per strip, 1 row, 1 row (the floor)
        monkeypatch.setattr(integer, "STRIP_POSITIONS", positions)
        assert np.array_equal(network(x), whole)


def test_artifact_is_a_channelwise_model(channelwise_model_dir):
    spec = read_spec(channelwise_model_dir)
    assert (spec.format_version, spec.family, spec.arch, spec.stride) == (4, "channelwise", "channelwise", 16)
    assert (spec.latent_channels, spec.hyper_channels) == (8, 16)
    model = spec.entropy_model
    assert list(model["slices"]) == [4, 4] and len(model["context"]) == 2
    assert len(model["gaussian"]["frequencies"]) == 64 * model["gaussian"]["mean_levels"]
    assert spec.metrics["val_bpp"] > 0 and spec.metrics["val_images"] == 2


def test_the_side_information_and_earlier_slices_decide_the_tables(channelwise_model_dir):
    """The decoder recomputes every table from z and the slices it has decoded, so it returns exactly
    the latents the encoder coded (each clipped to its table, centred on its predicted mean)."""
    codec = load_codec(channelwise_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(5), 3, sizes=[(70, 50)]))
    latent = codec.analysis(images)
    z = codec._side(latent)
    for y, side in zip(latent, z):
        code, held = codec.coder.encode(y, side)
        assert np.array_equal(codec.coder.decode(code, *y.shape[:2]), held)
        assert np.array_equal(codec.coder.clipped(y, side), held)  # what the int format stores
        centre, table = codec.coder.table_of(held, side)
        radius = codec.coder.radius[table]
        assert (np.abs(held.astype(np.int64) - centre) <= radius).all()
        assert table.max() < len(codec.coder.radius)


def test_the_mean_picks_its_centre_and_fraction_in_integers():
    """acc / 2**bits rounded to 1/levels: its integer part centres the table, its fraction picks it."""
    from families.channelwise.codec import ChannelwiseCoder

    coder = ChannelwiseCoder.__new__(ChannelwiseCoder)
    coder.levels, coder.bits, coder.scales, coder.latent_channels, coder.feature_bits = 8, 3, 64, 1, 0
    coder.slices, coder.starts = [1], [0]
    coder.acc_bits = [np.array([10, 10])]
    coder.maps = [(np.array([10]), np.array([0]), np.array([1 << 20]))]
    means = np.array([-2.51, -0.5, -0.06, 0.0, 0.06, 0.44, 0.5, 1.3, 7.94])
    acc = np.round(means * 1024).astype(np.int64)
    coder.contexts = [lambda x, acc=acc: np.stack([acc, np.zeros_like(acc)], axis=-1)[None]]
    centre, table = coder._tables(0, np.zeros((1, len(acc), 2)), np.zeros((1, len(acc), 0)))
    steps = np.floor(acc / 1024 * 8 + 0.5)
    assert np.array_equal(centre[0, :, 0], np.floor(steps / 8 + 0.5))
    fraction = table[0, :, 0] % 8
    assert np.array_equal((fraction - 4) / 8 + centre[0, :, 0], steps / 8)


def test_a_trained_scale_hyperprior_is_where_a_channelwise_model_starts(hyperprior_model_dir):
    """from_hyperprior's weights compute the scale hyperprior's rates exactly (no correction yet)."""
    import tensorflow as tf

    from training import weights
    from families.channelwise.train import ChannelwiseTrainer, from_hyperprior
    from families.hyperprior.train import HyperpriorTrainer
    from training.loop import PhotoConfig

    config = PhotoConfig(filters=16, latent_channels=8, family="hyperprior")
    hyper = HyperpriorTrainer(config)
    hyper.checkpoint.restore(tf.train.latest_checkpoint(hyperprior_model_dir + "/../checkpoints")).expect_partial()
    cw = ChannelwiseTrainer(PhotoConfig(filters=16, latent_channels=8, family="channelwise", slices=2,
                                          context_filters=8))
    arrays = from_hyperprior(weights.arrays(hyper))
    for name, v in weights.named_variables(cw).items():
        if name in arrays:
            v.assign(arrays[name])
    image = smooth_photos(np.random.default_rng(2), 1, sizes=[(64, 48)])[0]
    y = tf.round(hyper.analysis(image[None].astype(np.float32) / 255.0))
    assert abs(cw.bits(y) - hyper.bits(y)) < 1e-3 * hyper.bits(y)


def test_a_hyperprior_artifact_starts_a_channelwise_model_that_computes_the_same(hyperprior_model_dir):
    """`--init-from photo:<q>` with --arch channelwise: the artifact's weights (training.weights.from_model,
    the side information's density fitted back to its frozen tables) give the rates the hyperprior
    trainer gives from the same artifact."""
    import tensorflow as tf

    from families.channelwise.train import ChannelwiseTrainer
    from families.hyperprior.train import HyperpriorTrainer
    from training import weights
    from training.loop import PhotoConfig

    arrays, history = weights.from_model(hyperprior_model_dir)
    assert history["family"] == "hyperprior" and "prior/matrix0" in arrays
    hyper = HyperpriorTrainer(PhotoConfig(filters=16, latent_channels=8, family="hyperprior"))
    assert weights.assign(hyper, arrays, hyperprior_model_dir, require_all=False) == []
    cw_arrays, cw_history = weights.from_model(hyperprior_model_dir, "channelwise")
    assert cw_history["as_family"] == "channelwise"
    cw = ChannelwiseTrainer(PhotoConfig(filters=16, latent_channels=8, family="channelwise", slices=2,
                                        context_filters=8))
    missing = weights.assign(cw, cw_arrays, hyperprior_model_dir, require_all=False)
    assert any(m.startswith("context") for m in missing) and not any(m.startswith("prior/") for m in missing)
    image = smooth_photos(np.random.default_rng(3), 1, sizes=[(64, 48)])[0]
    y = tf.round(hyper.analysis(image[None].astype(np.float32) / 255.0))
    assert abs(cw.bits(y) - hyper.bits(y)) < 1e-3 * hyper.bits(y)
    # Through the command: a model name or folder as --init-from, and the error for an unknown name.
    with pytest.raises(LatentpackError, match="no shipped model 'photo:99'"):
        from training.train import main

        main(["--arch", "channelwise", "--input", "x/*.png", "--input-format", "images", "--filters", "16",
              "--latent-channels", "8", "--crop", "32", "--steps", "2", "--model-dir", "unused",
              "--init-from", "photo:99"])


def test_a_channelwise_run_starts_from_a_model_folder(tmp_path, photo_folder, hyperprior_model_dir, capsys):
    from training.train import main

    out = str(tmp_path / "cw")
    assert main(["--arch", "channelwise", "--input", str(photo_folder / "*.png"), "--input-format", "images",
                 "--filters", "16", "--latent-channels", "8", "--slices", "2", "--context-filters", "8",
                 "--crop", "32", "--batch-size", "2", "--steps", "2", "--warmup-steps", "2",
                 "--validate-every", "2", "--checkpoint-every", "2", "--model-dir", out,
                 "--init-from", hyperprior_model_dir]) == 0
    printed = capsys.readouterr().out
    assert "entropy model alone" in printed and "model written to" in printed
    spec = read_spec(out)
    assert spec.family == "channelwise" and spec.training["steps_done"] == 2


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
    (lambda s: s["entropy_model"]["context"][0][-1].pop("index_step"), "integer mappings"),
    (lambda s: s["entropy_model"].__setitem__("slices", [4, 5]), "slices"),
    (lambda s: s["entropy_model"]["gaussian"].__setitem__("mean_levels", 3), "power-of-two"),
    (lambda s: s["entropy_model"]["gaussian"]["frequencies"].pop(), "tables"),
    (lambda s: s["entropy_model"]["context"][1][0].__setitem__("kernel_shape", [3, 3, 1, 1]), "do not match"),
    (lambda s: s["entropy_model"]["hyper_synthesis"][0].__setitem__("shift", 99), "shift"),
    (lambda s: s["entropy_model"].pop("feature_bits"), "feature_bits"),
])
def test_an_inconsistent_channelwise_artifact_is_one_clear_error(channelwise_model_dir, tmp_path, change, message):
    copy = _altered_copy(channelwise_model_dir, tmp_path, change)
    with pytest.raises(LatentpackError, match=message):
        load_codec(copy)


def test_a_fit_from_a_model_under_a_time_budget_gets_a_verdict(tmp_path, photo_folder, hyperprior_model_dir, capsys):
    """--init-from a model with --minutes: trains until the budget is spent, then measures the fit
    and its start on the same held-out images (real codes). A fit that does not beat its start
    writes nothing (an earlier --model-dir stays); --export-anyway keeps it."""
    from training.train import main

    out = str(tmp_path / "fit")
    common = ["--arch", "hyperprior", "--input", str(photo_folder / "*.png"), "--input-format", "images",
              "--filters", "16", "--latent-channels", "8", "--crop", "32", "--batch-size", "2",
              "--validate-every", "100000", "--checkpoint-every", "100000", "--model-dir", out,
              "--init-from", hyperprior_model_dir, "--learning-rate", "1e-9"]  # learns nothing: its new z density is worse
    assert main(common + ["--minutes", "0.05", "--checkpoint-dir", str(tmp_path / "ck1")]) == 0
    printed = capsys.readouterr().out
    verdict = json.load(open(tmp_path / "ck1" / "verdict.json"))
    assert "held-out verdict on" in printed and verdict["start"]["val_images"] == verdict["fit"]["val_images"] > 0
    assert verdict["start_loss"] == pytest.approx(verdict["start"]["val_bpp"] + 0.013 * verdict["start"]["val_mse"])
    assert not verdict["better"] and "nothing written" in printed and not os.path.exists(out)
    # Against WebP and AVIF on the same held-out images: the bits each needs at the fit's PSNR (a
    # start that is not a shipped model has no ladder of its own to compare with).
    assert set(verdict["equal_psnr"]) == {"webp", "avif"} and "bits at the fit's PSNR against WebP" in printed
    for codec, change in verdict["equal_psnr"].items():
        curve = verdict["curves"][codec]
        if change is not None:
            assert min(p["val_psnr"] for p in curve) <= verdict["fit"]["val_psnr"] <= max(p["val_psnr"] for p in curve)
    assert main(common + ["--steps", "3", "--export-anyway", "--checkpoint-dir", str(tmp_path / "ck2")]) == 0
    printed = capsys.readouterr().out
    assert "model written to" in printed and read_spec(out).training["steps_done"] == 3
    # Every validation of a fit says what it gained on the held-out images so far; loss.png draws it.
    history = json.load(open(tmp_path / "ck2" / "history.json"))
    last = history["val"][-1]
    assert history["val_start"]["step"] == 0 and "against the start model" in printed
    assert f"{last['val_loss'] / history['val_start']['val_loss'] - 1:+.1%} against the start model" in printed
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0
    with pytest.raises(LatentpackError, match="--minutes must be a positive number"):
        main(common + ["--minutes", "0"])
