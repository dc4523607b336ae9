"""train -> encode -> decode through the `latentpack` command, as a user runs it."""
import os

import numpy as np
from PIL import Image

from conftest import BEAM_TEST_ARGS, write_tfrecord
from latentpack import cli


def test_train_encode_decode(tmp_path, mnist):
    images, labels = mnist
    train, held = images[:2000], images[4800:]
    write_tfrecord(tmp_path / "train.tfrecord", train, labels[:2000])
    keys = [f"held/{i:03d}" for i in range(len(held))]
    write_tfrecord(tmp_path / "held.tfrecord", held, labels[4800:], keys)
    model, lat, png = (str(tmp_path / n) for n in ("model", "lat", "png"))
    assert cli.main(["train", "--input", str(tmp_path / "train.tfrecord"), "--model-dir", model,
                     "--epochs", "8"]) == 0
    assert cli.main(["encode", "--input", str(tmp_path / "held.tfrecord"), "--model-dir", model,
                     "--output", lat] + BEAM_TEST_ARGS) == 0
    assert cli.main(["decode", "--input", lat, "--model-dir", model, "--output", png] + BEAM_TEST_ARGS) == 0
    recon = np.stack([np.asarray(Image.open(os.path.join(png, k + ".png"))) for k in keys]).astype(float)
    orig = held[..., 0].astype(float)
    # Each reconstruction is closer to its own original than to any other held-out image.
    dist = ((recon[:, None] - orig[None]) ** 2).sum(axis=(2, 3))
    own = np.diag(dist)
    assert (dist.argmin(axis=1) == np.arange(len(keys))).mean() >= 0.9
    assert np.median(own) < 0.5 * np.median(dist[~np.eye(len(keys), dtype=bool)])
    lat_bytes = sum(os.path.getsize(os.path.join(lat, f)) for f in os.listdir(lat) if f.endswith(".parquet"))
    assert lat_bytes / len(keys) < 100  # far below the ~280 bytes of a PNG digit


def test_rgb_32x32_end_to_end(tmp_path):
    """Colour images of another size: train, encode from .npz, decode to PNG, through the command."""
    rng = np.random.default_rng(0)
    # Smooth colour images (upsampled 4x4 noise): learnable, unlike white noise.
    images = rng.integers(0, 256, (400, 4, 4, 3)).astype(np.uint8).repeat(8, axis=1).repeat(8, axis=2)
    np.savez(tmp_path / "train.npz", images=images[:360])
    np.savez(tmp_path / "held.npz", images=images[360:], keys=np.array([f"rgb/{i}" for i in range(40)]))
    model, lat, png = (str(tmp_path / n) for n in ("model", "lat", "png"))
    assert cli.main(["train", "--input", str(tmp_path / "train.npz"), "--input-format", "npz", "--model-dir", model,
                     "--epochs", "4", "--latent-dim", "24", "--lambda", "0.001"]) == 0
    assert cli.main(["encode", "--input", str(tmp_path / "held.npz"), "--input-format", "npz", "--model-dir", model,
                     "--output", lat] + BEAM_TEST_ARGS) == 0
    assert cli.main(["decode", "--input", lat, "--model-dir", model, "--output", png] + BEAM_TEST_ARGS) == 0
    recon = np.stack([np.asarray(Image.open(os.path.join(png, f"rgb/{i}.png"))) for i in range(40)])
    assert recon.shape == (40, 32, 32, 3)
    err = np.abs(recon.astype(float) - images[360:]).mean()
    assert err < np.abs(images[360:].astype(float) - images[360:].mean()).mean()  # better than a flat guess
