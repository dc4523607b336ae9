"""Shared fixtures: tiny real data (the embedded MNIST sample), real shards, one trained artifact."""
import os
import types

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline.formats import load_mnist_sample  # noqa: E402
from pipeline.images import encode_png  # noqa: E402
from pipeline.tfrecord import frame, make_example  # noqa: E402

# In-process runner that needs no download (the default DirectRunner may try to fetch Prism).
BEAM_TEST_ARGS = ["--runner=FnApiRunner"]


@pytest.fixture(scope="session")
def mnist():
    """(uint8 [5000,28,28,1], labels), shuffled once with a fixed seed."""
    images, labels = load_mnist_sample()
    order = np.random.default_rng(1).permutation(len(images))
    return images[order], labels[order]


def write_tfrecord(path, images, labels=None, keys=None, extra_records=()):
    """A TFRecord shard of PNG Examples (+ any raw framed records appended)."""
    with open(path, "wb") as f:
        for i, image in enumerate(images):
            key = None if keys is None else keys[i]
            label = None if labels is None else int(labels[i])
            f.write(frame(make_example(encode_png(image), key, label)))
        for record in extra_records:
            f.write(frame(record))
    return str(path)


@pytest.fixture
def shards(tmp_path, mnist):
    """Three TFRecord shards of 40 labelled, keyed digits each: .pattern, .images, .labels, .keys."""
    images, labels = mnist[0][:120], mnist[1][:120]
    keys = [f"digits/{i:04d}" for i in range(120)]
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        sl = slice(40 * s, 40 * (s + 1))
        write_tfrecord(folder / f"part-{s}.tfrecord", images[sl], labels[sl], keys[sl])
    return types.SimpleNamespace(pattern=str(folder / "*.tfrecord"), images=images, labels=labels, keys=keys)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, mnist):
    """A small conv artifact trained for a few epochs on 1,500 sample digits."""
    from training.train import TrainConfig, train

    out = str(tmp_path_factory.mktemp("model") / "artifact")
    train(TrainConfig(arch="conv", latent_dim=16, epochs=4, batch_size=64, seed=0), mnist[0][1000:2500], out)
    return out


@pytest.fixture(scope="session")
def rd_model_dir(tmp_path_factory, mnist):
    """A small rate-distortion artifact (learned prior, entropy-coded latents)."""
    from training.train import TrainConfig, train

    out = str(tmp_path_factory.mktemp("rd-model") / "artifact")
    train(TrainConfig(arch="conv", latent_dim=16, epochs=3, batch_size=64, seed=0, lmbda=0.02),
          mnist[0][1000:2500], out)
    return out
