import os

import numpy as np
import pytest

from pipeline.codec import load_codec
from families.dense.model import build
from families.dense.train import TrainConfig, split, train


def test_mlp_is_the_reference_model():
    encoder, decoder = build("mlp", (28, 28, 1), 32)
    dense = lambda m: [(l.units, l.activation.__name__) for l in m.layers if hasattr(l, "units")]
    assert dense(encoder) == [(64, "relu"), (32, "relu")]
    assert dense(decoder) == [(32, "relu"), (64, "relu"), (784, "sigmoid")]


def test_conv_takes_any_shape():
    for shape in [(28, 28, 1), (32, 32, 3), (30, 18, 3)]:
        encoder, decoder = build("conv", shape, 8)
        z = encoder(np.zeros((2,) + shape, np.float32))
        assert tuple(z.shape) == (2, 8)
        assert tuple(decoder(z).shape) == (2,) + shape


def test_split_is_seeded_and_disjoint():
    x = np.arange(100)[:, None]
    a_train, a_val = split(x, 0.2, seed=3)
    b_train, b_val = split(x, 0.2, seed=3)
    assert np.array_equal(a_val, b_val) and len(a_val) == 20
    assert not set(a_train[:, 0]) & set(a_val[:, 0])


def test_train_rgb_32x32_exports_a_working_artifact(tmp_path):
    rng = np.random.default_rng(0)
    # Smooth random colour images: learnable, unlike white noise.
    base = rng.integers(0, 256, (300, 4, 4, 3)).astype(np.uint8)
    images = base.repeat(8, axis=1).repeat(8, axis=2)
    spec = train(TrainConfig(arch="conv", latent_dim=8, epochs=2, batch_size=32), images, str(tmp_path / "m"))
    assert spec["image_shape"] == [32, 32, 3]
    codec = load_codec(str(tmp_path / "m"))
    assert codec.decode(codec.encode(images[:5])).shape == (5, 32, 32, 3)


def test_quality_preset_from_the_command_line(tmp_path):
    from latentpack import cli
    from pipeline.artifact import read_spec
    from families.dense.rd import QUALITY_PRESETS

    out = str(tmp_path / "q1")
    assert cli.main(["train", "--input-format", "mnist-sample", "--quality", "1", "--epochs", "1", "--limit", "300",
                     "--model-dir", out]) == 0
    spec = read_spec(out)
    lmbda, latent_dim, width = QUALITY_PRESETS[1]
    assert (spec.training["quality"], spec.training["lmbda"], spec.latent_dim, spec.architecture["width"]) == (
        1, lmbda, latent_dim, width)
    assert TrainConfig.from_quality(1, epochs=3).epochs == 3
    # The entropy model is a mixture of 16 table sets (set 0: the trained prior) unless told otherwise.
    assert spec.entropy_model["kind"] == "factorized-mixture" and len(spec.entropy_model["components"]) == 16
    assert spec.training["mixture"] == 16 and spec.format_version == 3


def test_mixture_option_and_fitting_an_older_artifact(tmp_path, capsys):
    import json
    import shutil

    from latentpack import cli
    from pipeline.artifact import read_spec
    from pipeline.formats import load_images
    from families.dense.train import add_mixture_to

    plain = str(tmp_path / "plain")
    args = ["train", "--input-format", "mnist-sample", "--lambda", "0.02", "--latent-dim", "16", "--epochs", "1",
            "--limit", "600"]
    assert cli.main(args + ["--mixture", "1", "--model-dir", plain]) == 0
    spec = read_spec(plain)
    assert spec.entropy_model["kind"] == "factorized-logistic" and spec.training["mixture"] == 1
    assert cli.main(args + ["--mixture", "0", "--model-dir", str(tmp_path / "bad")]) == 2
    assert "--mixture must be between 1 and 256" in capsys.readouterr().err
    # An artifact exported before mixtures existed: its tables fitted as training fits them, same SavedModel.
    older = str(tmp_path / "older")
    shutil.copytree(plain, older)
    _, images, _, _ = load_images(None, "mnist-sample", 600)
    new = add_mixture_to(older, images)
    assert new["entropy_model"]["kind"] == "factorized-mixture" and new["training"]["mixture"] == 16
    assert new["fingerprint"] != spec.fingerprint and read_spec(older).fingerprint == new["fingerprint"]
    assert new["metrics"]["val_code_bytes"] < spec.metrics["val_code_bytes"]
    codec = load_codec(older)
    latents = codec.encode(images[:50])
    assert np.array_equal(codec.entropy.decode(codec.entropy.encode(latents)), latents)
    with open(f"{older}/codec.json") as f:
        assert json.load(f)["entropy_model"]["components"][0] == list(map(list, spec.entropy_model["frequencies"]))


def test_settings_that_cannot_train_are_one_error_line_each(tmp_path, capsys):
    import pytest

    from latentpack import cli

    base = ["train", "--arch", "spatial", "--input", str(tmp_path / "none-*.png"), "--input-format", "images",
            "--model-dir", str(tmp_path / "m")]
    for extra, message in [(["--steps", "0"], "--steps must be at least 1"),
                           (["--batch-size", "0"], "--batch-size must be at least 1"),
                           (["--filters", "0"], "--filters must be at least 1"),
                           (["--lambda", "-1"], "--lambda must be a positive number"),
                           (["--lambda", "nan"], "--lambda must be a positive number"),
                           (["--learning-rate", "0"], "--learning-rate must be a positive number"),
                           (["--crop", "40"], "--crop must be a multiple of --stride 16"),
                           (["--stride", "8", "--crop", "4"], "--crop must be a multiple of --stride 8"),
                           (["--validate-every", "0"], "--validate-every must be at least 1"),
                           (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
                           (["--val-fraction", "1"], "--val-fraction must be at least 0 and below 1")]:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert f"latentpack: error: {message}" in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m-checkpoints").exists()
    with pytest.raises(SystemExit):  # argparse's own: not a number
        cli.main(base + ["--steps", "many"])


def test_train_never_writes_over_a_shipped_model_or_a_folder_of_other_files(tmp_path, capsys):
    from latentpack import cli
    from pipeline import models

    shipped = models.shipped()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    targets = [str(folder)] + (["photo:1", shipped["photo:1"]] if "photo:1" in shipped else [])
    before = {p: sorted(os.listdir(models.resolve(p))) for p in targets}
    for target in targets:
        assert cli.main(["train", "--input-format", "mnist-sample", "--epochs", "1", "--limit", "300",
                         "--model-dir", target]) == 2
        err = capsys.readouterr().err
        assert "latentpack: error: --model-dir" in err and ("shipped model" in err or "not a model artifact" in err)
        assert sorted(os.listdir(models.resolve(target))) == before[target]
    assert (folder / "notes.txt").read_text() == "mine"
    # A folder holding an earlier artifact is replaced: training again is a re-run.
    out = str(tmp_path / "model")
    for _ in range(2):
        assert cli.main(["train", "--input-format", "mnist-sample", "--epochs", "1", "--limit", "300",
                         "--model-dir", out]) == 0
    assert load_codec(out).decode(load_codec(out).encode(np.zeros((1, 28, 28, 1), np.uint8))).shape == (1, 28, 28, 1)


def test_an_export_that_fails_or_stops_midway_leaves_the_earlier_artifact_whole(tmp_path):
    import pytest

    from training.export import recover, staged

    model = tmp_path / "model"
    model.mkdir()
    (model / "codec.json").write_text("earlier")
    with pytest.raises(KeyboardInterrupt):
        with staged(str(model)) as out:
            (tmp_path / "model.partial" / "codec.json").write_text("half")
            assert out == str(tmp_path / "model.partial")
            raise KeyboardInterrupt
    assert (model / "codec.json").read_text() == "earlier" and sorted(os.listdir(tmp_path)) == ["model"]
    with staged(str(model)) as out:
        (tmp_path / "model.partial" / "codec.json").write_text("new")
    assert (model / "codec.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]
    # Stopped between the two renames: the earlier artifact waits aside and is put back first.
    os.replace(model, tmp_path / "model.replaced")
    recover(str(model))
    assert (model / "codec.json").read_text() == "new"


def test_bits_at_equal_psnr_interpolate_a_curve_and_never_extrapolate():
    from training.measure import bits_at, equal_quality

    curve = [{"val_psnr": 30.0, "val_bpp": 0.5}, {"val_psnr": 34.0, "val_bpp": 2.0}, {"val_psnr": 32.0, "val_bpp": 1.0}]
    assert bits_at(curve, 32.0) == pytest.approx(1.0)
    assert bits_at(curve, 31.0) == pytest.approx(np.sqrt(0.5 * 1.0))  # log-rate halfway
    assert bits_at(curve, 29.9) is None and bits_at(curve, 34.1) is None and bits_at(curve[:1], 30.0) is None
    fit = {"val_psnr": 32.0, "val_bpp": 0.8}
    assert equal_quality(fit, {"avif": curve, "webp": curve[:1]}) == {"avif": pytest.approx(-0.2), "webp": None}
