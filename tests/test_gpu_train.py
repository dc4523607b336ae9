"""Weights files (training.weights) and the PyTorch GPU trainer (scripts/gpu_train.py).

The GPU trainer's tests need PyTorch, which latentpack itself does not depend on (the device
machines have it, TensorFlow they lack); the test extra installs its CPU build, so they run in
`make test` (skipped only where PyTorch is missing, and reported as such)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.errors import LatentpackError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(filters=16, latent_channels=8, crop=32, batch_size=2, family="hyperprior")


def _trainer(**kw):
    import keras

    import families
    from training.loop import PhotoConfig

    keras.utils.set_random_seed(kw.pop("seed", 0))
    config = PhotoConfig(**dict(SMALL, **kw))
    return families.family(config.family).trainer_module().TRAINER(config)


def test_weights_file_round_trip_sets_every_weight_and_the_step(tmp_path):
    from training import weights

    a, b = _trainer(seed=1), _trainer(seed=2)
    a.step.assign(123)
    weights.save(a, str(tmp_path / "w.npz"), {"seconds": 5.0})
    step, history, missing = weights.load(b, str(tmp_path / "w.npz"))
    assert (step, history, missing, int(b.step)) == (123, {"seconds": 5.0}, [], 123)
    names = weights.named_variables(a)
    assert len(names) == len(a.variables) and "synthesis/igdn0/gamma" in names and "prior/matrix0" in names
    for name, v in weights.named_variables(b).items():
        np.testing.assert_array_equal(v.numpy(), names[name].numpy())


def test_new_weights_of_any_size(tmp_path):
    from training import weights

    assert weights.main(["new", str(tmp_path / "w.npz"), "--filters", "12", "--latent-channels", "20"]) == 0
    arrays, step, history = weights.read(str(tmp_path / "w.npz"))
    assert step == 0 and history == {"new": {"filters": 12, "latent_channels": 20, "seed": 0}}
    assert arrays["analysis/conv3/kernel"].shape == (5, 5, 12, 20) and "prior/matrix0" in arrays
    weights.load(_trainer(filters=12, latent_channels=20), str(tmp_path / "w.npz"))  # every weight there
    # A weights file rewritten with half-size kernels (what travels to a lent machine).
    assert weights.main([str(tmp_path / "w.npz"), str(tmp_path / "h.npz"), "--kernels", "float16"]) == 0
    half, step, again = weights.read(str(tmp_path / "h.npz"))
    assert half["analysis/conv3/kernel"].dtype == np.float16 and half["synthesis/igdn0/gamma"].dtype == np.float32
    assert (step, again) == (0, history)
    np.testing.assert_allclose(half["analysis/conv0/kernel"], arrays["analysis/conv0/kernel"], rtol=1e-3)


def test_a_stride_16_model_becomes_the_start_of_a_stride_8_model(tmp_path):
    """--stride 8: every weight of a stride-8 model, from the stride-16 layers of the same shape
    (the high-rate photo models started this way)."""
    from training import weights

    assert weights.main(["new", str(tmp_path / "w.npz"), "--filters", "12", "--latent-channels", "20"]) == 0
    assert weights.main([str(tmp_path / "w.npz"), str(tmp_path / "s8.npz"), "--stride", "8"]) == 0
    old, _, _ = weights.read(str(tmp_path / "w.npz"))
    new, step, history = weights.read(str(tmp_path / "s8.npz"))
    assert step == 0 and "to_stride8" in history
    trainer = _trainer(filters=12, latent_channels=20, stride=8)
    weights.load(trainer, str(tmp_path / "s8.npz"))  # every weight of the stride-8 model, in its shape
    for name, value in weights.arrays(trainer).items():
        np.testing.assert_array_equal(value, new[name])
    # The latents come from the last analysis layer, the pixels from the last synthesis layer.
    np.testing.assert_array_equal(new["analysis/conv2/kernel"], old["analysis/conv3/kernel"])
    np.testing.assert_array_equal(new["synthesis/deconv2/kernel"], old["synthesis/deconv3/kernel"])
    np.testing.assert_array_equal(new["synthesis/igdn1/gamma"], old["synthesis/igdn2/gamma"])
    np.testing.assert_array_equal(new["hyper_synthesis/hdeconv2/kernel"], old["hyper_synthesis/hdeconv2/kernel"])
    assert "analysis/conv3/kernel" not in new and "synthesis/deconv3/bias" not in new
    with pytest.raises(LatentpackError, match="stride-16"):  # already stride 8
        weights.main([str(tmp_path / "s8.npz"), str(tmp_path / "again.npz"), "--stride", "8"])


def test_a_weights_file_of_another_model_is_one_clear_error(tmp_path):
    from training import weights

    weights.save(_trainer(), str(tmp_path / "w.npz"))
    with pytest.raises(LatentpackError, match="shape"):
        weights.load(_trainer(filters=8), str(tmp_path / "w.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(LatentpackError, match="not a weights file"):
        weights.load(_trainer(), str(tmp_path / "junk.npz"))


def test_a_shipped_model_becomes_trainer_weights_that_compute_its_codes(tmp_path):
    """from_artifact: dequantized kernels, GDN reparameterized, the integer hyper-synthesis as an
    equivalent float network (the Gaussian table indexes within one of the integer network's)."""
    import tensorflow as tf

    from pipeline import models
    from families.hyperprior.codec import IntegerHyperSynthesis
    from training import weights
    from families.hyperprior.train import SCALE_LEVELS, SCALE_MAX, SCALE_MIN, HyperpriorTrainer, pad_grid
    from training.loop import PhotoConfig

    model_dir = models.resolve("photo:1")
    assert weights.main([model_dir, str(tmp_path / "w.npz")]) == 0
    trainer = HyperpriorTrainer(PhotoConfig(family="hyperprior"))
    step, history, missing = weights.load(trainer, str(tmp_path / "w.npz"), require_all=False)
    assert step == 0 and history["from_artifact"] == model_dir and history["steps_before"] > 0
    assert not missing  # the side information's density too, fitted back to its tables (below)

    image = np.random.default_rng(0).integers(0, 256, (1, 64, 96, 3)).astype(np.uint8)
    image = np.round(tf.nn.avg_pool2d(image.astype(np.float32), 5, 1, "SAME").numpy()).astype(np.uint8)
    module = tf.saved_model.load(model_dir)
    y = module.signatures["encode"](images=image)["latent"].numpy()
    np.testing.assert_array_equal(np.round(trainer.analysis(image.astype(np.float32) / 255.0).numpy()), y)
    z = module.signatures["hyper_encode"](latent=y)["hyper"].numpy()
    np.testing.assert_array_equal(np.round(trainer.hyper_analysis(np.abs(pad_grid(tf.constant(y, tf.float32))))
                                           .numpy()), z)
    with open(os.path.join(model_dir, "codec.json")) as f:
        layers = json.load(f)["entropy_model"]["hyper_synthesis"]
    exact = IntegerHyperSynthesis(layers, [k.numpy() for k in module.hyper_kernels],
                                  [b.numpy() for b in module.hyper_biases], SCALE_LEVELS)(z[0])
    delta = (np.log(SCALE_MAX) - np.log(SCALE_MIN)) / (SCALE_LEVELS - 1)
    log_scale = trainer.hyper_synthesis(z.astype(np.float32)).numpy()[0]
    index = np.clip(np.floor((log_scale - np.log(SCALE_MIN)) / delta + 0.5), 0, SCALE_LEVELS - 1)
    assert np.abs(index - exact).max() <= 1 and np.mean(index != exact) < 0.01
    pixels = module.signatures["decode"](latent=y)["image"].numpy().astype(int)
    ours = np.round(np.clip(trainer.synthesis(y.astype(np.float32)).numpy(), 0, 1) * 255)
    assert np.abs(pixels - ours).max() <= 1


def test_the_side_informations_density_is_recovered_from_its_frozen_tables():
    """An artifact stores the side information's density only as integer tables; a run from it must
    start from that density, not a fresh one (which cost +31% bits on CIFAR-10 at step 1). Frozen
    again, the recovered density gives tables within a thousandth of a bit per symbol of the
    shipped ones (a fresh density: bits per symbol more than the tables' own entropy)."""
    from pipeline import models
    from families.hyperprior.weights import prior_from_tables
    from training.prior import DeepFactorizedPrior, freeze_channels

    with open(os.path.join(models.resolve("photo:1"), "codec.json")) as f:
        shipped = json.load(f)["entropy_model"]["hyper"]

    def kl(tables):  # bits per symbol the refrozen tables cost beyond the shipped ones', per channel
        out = []
        for c, (offset, freq) in enumerate(zip(shipped["offsets"], shipped["frequencies"])):
            p = np.asarray(freq, float) / np.sum(freq)
            q = np.asarray(tables["frequencies"][c], float) / np.sum(tables["frequencies"][c])
            at = offset + np.arange(len(p)) - tables["offsets"][c]
            inside = (at >= 0) & (at < len(q))
            mass = np.where(inside, q[np.clip(at, 0, len(q) - 1)], 2.0 ** -16)
            out.append(float(np.sum(p * np.log2(p / mass))))
        return np.array(out)

    recovered = DeepFactorizedPrior(len(shipped["offsets"]), name="prior")
    arrays = prior_from_tables(shipped)
    for w in recovered.weights:
        w.assign(arrays[f"prior/{w.name}"])
    assert kl(freeze_channels(recovered)).max() < 0.005
    fresh = DeepFactorizedPrior(len(shipped["offsets"]), name="prior")
    entropy = np.mean([-np.sum(np.asarray(f) / sum(f) * np.log2(np.asarray(f) / sum(f))) for f in shipped["frequencies"]])
    assert kl(freeze_channels(fresh)).mean() > entropy


def test_train_exports_a_weights_file_as_it_is_and_resume_continues_it(tmp_path, photo_folder, capsys):
    from pipeline.artifact import read_spec
    from training import weights
    from training.train import main

    trainer = _trainer()
    trainer.step.assign(7)
    weights.save(trainer, str(tmp_path / "run.npz"), {"train": [], "val": [], "seconds": 12.5,
                                                     "trainer": {"device": "test"}})
    args = ["--arch", "hyperprior", "--input", str(photo_folder / "*.png"), "--input-format", "images",
            "--quality", "2", "--filters", "16", "--latent-channels", "8", "--crop", "32", "--batch-size", "2",
            "--validate-every", "100", "--checkpoint-every", "100"]
    out = str(tmp_path / "model")
    assert main(args + ["--init-from", str(tmp_path / "run.npz"), "--model-dir", out]) == 0  # --steps: the file's
    spec = read_spec(out)
    assert spec.training["steps_done"] == 7 and spec.training["seconds"] == 12.5
    with open(os.path.join(out, "history.json")) as f:
        assert json.load(f)["trainer"] == {"device": "test"}
    exported = _trainer(seed=5)
    exported.checkpoint.restore(os.path.join(out + "-checkpoints", "ckpt-7")).expect_partial()
    for a, b in zip(trainer.variables, exported.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The CPU can carry on from there.
    assert main(args + ["--steps", "9", "--resume", "--model-dir", str(tmp_path / "more"),
                        "--checkpoint-dir", out + "-checkpoints"]) == 0
    assert read_spec(str(tmp_path / "more")).training["steps_done"] == 9
    with pytest.raises(LatentpackError, match="no such weights file"):
        main(args + ["--steps", "7", "--init-from", str(tmp_path / "none.npz"), "--model-dir", str(tmp_path / "x")])


# --- the PyTorch trainer --------------------------------------------------------------------


@pytest.fixture
def gpu_train():
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import gpu_train
        yield gpu_train
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))


def test_the_pytorch_trainer_mirrors_the_tensorflow_constants(gpu_train):
    """gpu_train cannot import them (it runs where Keras is not): it must copy them exactly."""
    from families.hyperprior.train import SCALE_MAX, SCALE_MIN
    from families.spatial.layers import _PEDESTAL, GDN
    from training.loop import PhotoConfig

    assert (gpu_train.PEDESTAL, gpu_train.BETA_MIN) == (_PEDESTAL, GDN().beta_min)
    assert (gpu_train.SCALE_MIN, gpu_train.SCALE_MAX) == (SCALE_MIN, SCALE_MAX)
    defaults = PhotoConfig()
    assert (gpu_train.HOLDOUT_EVERY, gpu_train.VAL_IMAGES) == (defaults.holdout_every, defaults.val_images)


@pytest.mark.parametrize("family,stride", [("hyperprior", 16), ("hyperprior", 8), ("channelwise", 16),
                                           ("channelwise", 8)])
def test_the_pytorch_model_is_the_tensorflow_model(gpu_train, monkeypatch, family, stride):
    """Same weights, same batch, same noise: the same MSE, bits and gradients; the same held-out
    figures. What makes a GPU run's weights mean the same in the exported artifact. The family
    and the stages come from the weights: stride 16 (photo:1-4) and 8 (photo:6)."""
    import tensorflow as tf
    import torch

    from training import weights

    extra = dict(slices=2, context_filters=8) if family == "channelwise" else {}
    trainer = _trainer(seed=3, stride=stride, family=family, **extra)
    rng = np.random.default_rng(0)
    for name, v in weights.named_variables(trainer).items():
        if name.startswith("context") and "conv2" in name:  # the corrections start at zero: give them some
            v.assign(rng.normal(0, 0.05, v.shape).astype(np.float32))
    arrays = weights.arrays(trainer)
    model = gpu_train.Model(arrays, torch.device("cpu"))
    assert (model.stride, model.family, model.slices) == (stride, family, [4, 4] if extra else [])
    x = rng.random((2, 64, 48, 3)).astype(np.float32)
    y_shape = (2, 64 // stride, 48 // stride, 8)
    z_shape = (2, -(-y_shape[1] // 4), -(-y_shape[2] // 4), 16)
    noise = {tuple(y_shape): rng.uniform(-0.5, 0.5, y_shape).astype(np.float32),
             tuple(z_shape): rng.uniform(-0.5, 0.5, z_shape).astype(np.float32)}
    monkeypatch.setattr(tf.random, "uniform", lambda shape, *a, **k: tf.constant(noise[tuple(int(s) for s in shape)]))
    with tf.GradientTape() as tape:
        mse, bpp = trainer.losses(tf.constant(x))
        loss = 0.01 * 255.0 ** 2 * mse + bpp
    grads = dict(zip(weights.named_variables(trainer), tape.gradient(loss, list(weights.named_variables(trainer)
                                                                                 .values()))))
    t_mse, t_bpp = model.losses(torch.tensor(x).permute(0, 3, 1, 2),
                                torch.tensor(noise[y_shape]).permute(0, 3, 1, 2),
                                torch.tensor(noise[z_shape]).permute(0, 3, 1, 2))
    (0.01 * 255.0 ** 2 * t_mse + t_bpp).backward()
    np.testing.assert_allclose(t_mse.item(), float(mse), rtol=1e-5)
    np.testing.assert_allclose(t_bpp.item(), float(bpp), rtol=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(model.params[name].grad.numpy(), g.numpy(), rtol=2e-3,
                                   atol=2e-5 * float(np.abs(g.numpy()).max()) + 1e-9, err_msg=name)
    images = [np.round(rng.random((40, 56, 3)) * 255).astype(np.uint8)]
    ours = model.evaluate([torch.tensor(i).permute(2, 0, 1) for i in images])
    theirs = trainer.evaluate(images)
    assert abs(ours["val_psnr"] - theirs["val_psnr"]) < 0.01 and abs(ours["val_bpp"] - theirs["val_bpp"]) < 1e-3


def test_a_gpu_run_exports_through_the_train_command(gpu_train, tmp_path, photo_folder):
    """scripts/gpu_train.py (here on the CPU, a few seconds) from a weights file, then export."""
    from pipeline.artifact import read_spec
    from training import weights
    from training.train import main

    weights.save(_trainer(), str(tmp_path / "init.npz"))
    out = tmp_path / "gpu.npz"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_train.py"), "--init",
                          str(tmp_path / "init.npz"), "--lmbda", "0.0035", "--data", str(photo_folder), "--out",
                          str(out), "--seconds", "3", "--crop", "32", "--batch", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "validation at step" in run.stdout and "weights in" in run.stdout
    _, step, history = weights.read(str(out))
    assert step > 0 and history["trainer"]["device"] == "cpu" and len(history["val"]) == 2
    assert history["before"] == {} and len(history["runs"]) == 1
    # A second run from the first one's output continues its history.
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_train.py"), "--init", str(out),
                          "--lmbda", "0.0035", "--data", str(photo_folder), "--out", str(tmp_path / "more.npz"),
                          "--seconds", "2", "--crop", "32", "--batch", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    _, more, continued = weights.read(str(tmp_path / "more.npz"))
    assert more > step and len(continued["runs"]) == 2 and continued["runs"][1]["start_step"] == step
    assert continued["seconds"] > history["seconds"] and continued["val"][:2] == history["val"]
    assert main(["--arch", "hyperprior", "--input", str(photo_folder / "*.png"), "--input-format", "images",
                 "--quality", "2", "--filters", "16", "--latent-channels", "8", "--crop", "32", "--batch-size", "2",
                 "--steps", str(step), "--init-from", str(out), "--model-dir", str(tmp_path / "model")]) == 0
    spec = read_spec(str(tmp_path / "model"))
    assert spec.training["steps_done"] == step and spec.metrics["val_images"] > 0
