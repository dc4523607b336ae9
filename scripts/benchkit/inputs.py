"""The benchmark's input: N MNIST images as TFRecord shards of PNG Examples, and a model."""
from __future__ import annotations

import gzip
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist", "train-images-idx3-ubyte.gz")


def source_images(n: int) -> np.ndarray:
    if os.path.exists(SHARED_MNIST):
        from pipeline.formats import read_idx
        base = read_idx(gzip.decompress(open(SHARED_MNIST, "rb").read()))[..., None]
    else:
        from pipeline.formats import load_mnist_sample
        base = load_mnist_sample()[0]
    return base[np.arange(n) % len(base)]


def write_input(folder: str, n: int, shards: int = 8) -> None:
    """N images as `shards` TFRecord files of PNG Examples (PNG bytes reused for repeats)."""
    from pipeline.images import encode_png
    from pipeline.tfrecord import write_shard

    if os.path.exists(os.path.join(folder, "_done")):
        return
    os.makedirs(folder, exist_ok=True)
    base = source_images(min(n, 60000))
    pngs = [encode_png(x) for x in base]
    for s, part in enumerate(np.array_split(np.arange(n), shards)):
        write_shard(os.path.join(folder, f"part-{s:05d}-of-{shards:05d}.tfrecord"), [pngs[i % len(pngs)] for i in part],
                    [f"img/{i:07d}" for i in part], [int(i % 10) for i in part])
    open(os.path.join(folder, "_done"), "w").close()


def make_model(model_dir: str, **config) -> None:
    if os.path.exists(os.path.join(model_dir, "codec.json")):
        return
    from pipeline.formats import load_mnist_sample
    from families.dense.train import TrainConfig, train
    # Throughput does not depend on how well the model is trained: one epoch is enough.
    train(TrainConfig(epochs=1, **config), load_mnist_sample()[0], model_dir)
