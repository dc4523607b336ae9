import gzip
import struct

import numpy as np
import pytest

from conftest import write_tfrecord
from pipeline.formats import get_reader, glob_root
from pipeline.errors import LatentpackError
from pipeline.images import encode_png
from pipeline.tfrecord import make_example


def read_all(fmt, pattern):
    reader = get_reader(fmt)
    shards, root = reader.match(pattern)
    return [rec for shard in shards for rec in reader.read(shard, root)]


def test_glob_root():
    assert glob_root("/data/imgs/**/*.png") == "/data/imgs"
    assert glob_root("gs://b/x/part-*.tfrecord") == "gs://b/x"
    assert glob_root("*.png") == ""


def test_tfrecord_keys_labels_and_fallback_keys(tmp_path, mnist):
    images = mnist[0][:3]
    write_tfrecord(tmp_path / "a.tfrecord", images, labels=[4, 5, 6], keys=["x", "y", "z"])
    write_tfrecord(tmp_path / "b.tfrecord", images[:2], extra_records=[make_example(b"junk")])
    recs = read_all("tfrecord", str(tmp_path / "*.tfrecord"))
    assert [r.key for r in recs] == ["x", "y", "z", "b.tfrecord:0", "b.tfrecord:1", "b.tfrecord:2"]
    assert [r.label for r in recs] == [4, 5, 6, None, None, None]
    assert recs[0].encoded == encode_png(images[0])


def test_images_folder_keys_are_relative_paths_without_extension(tmp_path, mnist):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "a.png").write_bytes(encode_png(mnist[0][0]))
    (tmp_path / "imgs" / "sub" / "b.png").write_bytes(encode_png(mnist[0][1]))
    recs = read_all("images", str(tmp_path / "imgs" / "**.png"))
    assert sorted(r.key for r in recs) == ["a", "sub/b"]


def test_npz_and_npy(tmp_path, mnist):
    np.savez(tmp_path / "d.npz", images=mnist[0][:4, ..., 0], labels=np.arange(4), keys=np.array(list("abcd")))
    recs = read_all("npz", str(tmp_path / "*.npz"))
    assert [(r.key, r.label) for r in recs] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
    assert np.array_equal(recs[2].pixels, mnist[0][2, ..., 0])
    np.save(tmp_path / "e.npy", mnist[0][:2])
    recs = read_all("npy", str(tmp_path / "*.npy"))
    assert [r.key for r in recs] == ["e:0", "e:1"] and recs[0].label is None


def test_idx_with_sibling_labels(tmp_path, mnist):
    images = mnist[0][:5, ..., 0]
    head = struct.pack(">BBBBIII", 0, 0, 8, 3, 5, 28, 28)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images.tobytes()))
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + labels.tobytes()))
    recs = read_all("idx", str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert [r.label for r in recs] == [3, 1, 4, 1, 5]
    assert np.array_equal(recs[4].pixels, images[4])


def test_mnist_sample_is_embedded():
    recs = read_all("mnist-sample", None)
    assert len(recs) == 5000 and recs[0].pixels.shape == (28, 28, 1)


def test_empty_glob_is_a_clear_error(tmp_path):
    with pytest.raises(LatentpackError, match="no files match"):
        get_reader("tfrecord").match(str(tmp_path / "nothing-*.tfrecord"))


def test_unknown_format_is_a_clear_error():
    with pytest.raises(LatentpackError, match="unknown input format"):
        get_reader("bmp-archive")
