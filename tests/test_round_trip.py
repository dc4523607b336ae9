"""Every input format through encode, every output format through decode (one parametrized suite)."""
import gzip
import io
import os
import struct
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS, write_tfrecord
from pipeline import decode, encode, latents
from pipeline.codec import load_codec
from pipeline.formats import get_reader
from pipeline.images import ImageBatch, batch_records, encode_png

N = 12


def keys_for(n):
    return [f"set/{i:03d}" for i in range(n)]


def write_tfrecord_input(folder, images, labels):
    write_tfrecord(folder / "a.tfrecord", images, labels, keys_for(len(images)))
    return str(folder / "*.tfrecord"), keys_for(len(images))


def write_images_input(folder, images, labels):
    for key, image in zip(keys_for(len(images)), images):
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.png").write_bytes(encode_png(image))
    return str(folder / "set" / "*.png"), [k.split("/")[1] for k in keys_for(len(images))]


def write_npz_input(folder, images, labels):
    np.savez(folder / "a.npz", images=images, labels=labels, keys=np.array(keys_for(len(images))))
    return str(folder / "*.npz"), keys_for(len(images))


def write_npy_input(folder, images, labels):
    np.save(folder / "arr.npy", images[..., 0])
    return str(folder / "*.npy"), [f"arr:{i}" for i in range(len(images))]


def write_idx_input(folder, images, labels):
    head = struct.pack(">BBBBIII", 0, 0, 8, 3, len(images), 28, 28)
    (folder / "t-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + images.tobytes()))
    return str(folder / "t-images-idx3-ubyte.gz"), [f"t-images-idx3-ubyte:{i}" for i in range(len(images))]


def write_parquet_input(folder, images, labels):
    # The layout Hugging Face datasets export: an `image` struct of {bytes, path}.
    image = pa.StructArray.from_arrays(
        [pa.array([encode_png(x) for x in images], pa.binary()), pa.array([f"{i}.png" for i in range(len(images))])],
        names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64()), "key": keys_for(len(images))})
    pq.write_table(table, folder / "train-00000.parquet")
    return str(folder / "*.parquet"), keys_for(len(images))


def write_webdataset_input(folder, images, labels):
    with tarfile.open(folder / "shard-000.tar", "w") as tar:
        for i, image in enumerate(images):
            for ext, data in ((".png", encode_png(image)), (".cls", str(int(labels[i])).encode())):
                info = tarfile.TarInfo(f"s{i:03d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder / "*.tar"), [f"s{i:03d}" for i in range(len(images))]


INPUTS = {"tfrecord": write_tfrecord_input, "images": write_images_input, "npz": write_npz_input,
          "npy": write_npy_input, "idx": write_idx_input, "parquet": write_parquet_input,
          "webdataset": write_webdataset_input}


@pytest.mark.parametrize("fmt", sorted(INPUTS))
def test_every_input_format_encodes(fmt, tmp_path, mnist, model_dir):
    images, labels = mnist[0][:N], mnist[1][:N]
    folder = tmp_path / "in"
    folder.mkdir()
    pattern, keys = INPUTS[fmt](folder, images, labels)
    out = str(tmp_path / "lat")
    manifest = encode.run(["--input", pattern, "--input-format", fmt, "--model-dir", model_dir,
                           "--output", out] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == N and manifest["counts"]["dead_lettered"] == 0
    table = pq.ParquetDataset(latents.part_paths(out, manifest)).read()
    by_key = dict(zip(table.column("key").to_pylist(), latents.latents_of(table)))
    assert sorted(by_key) == sorted(keys)
    expected = load_codec(model_dir).encode(images)
    for i, key in enumerate(keys):
        assert np.array_equal(by_key[key], expected[i]), key


OUTPUT_READERS = {"png": ("images", "**.png"), "tfrecord": ("tfrecord", "*.tfrecord"),
                  "npz": ("npz", "*.npz"), "parquet": ("parquet", "*.parquet")}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, mnist, model_dir):
    folder = tmp_path_factory.mktemp("ds")
    write_tfrecord(folder / "a.tfrecord", mnist[0][:N], mnist[1][:N], keys_for(N))
    out = str(folder / "lat")
    encode.run(["--input", str(folder / "a.tfrecord"), "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS)
    return out


@pytest.mark.parametrize("fmt", sorted(OUTPUT_READERS))
def test_every_output_format_decodes(fmt, tmp_path, mnist, model_dir, small_dataset):
    out = str(tmp_path / "dec")
    manifest = decode.run(["--input", small_dataset, "--model-dir", model_dir, "--output", out,
                           "--output-format", fmt] + BEAM_TEST_ARGS)
    assert manifest["counts"] == {"read": N, "written": N, "dead_lettered": 0, "dead_lettered_by_reason": {}}
    codec = load_codec(model_dir)
    expected = dict(zip(keys_for(N), codec.decode(codec.encode(mnist[0][:N]))))
    reader_name, glob = OUTPUT_READERS[fmt]
    reader = get_reader(reader_name)
    shards, root = reader.match(os.path.join(out, glob))
    got = {}
    for shard in shards:
        for item in batch_records(reader.read(shard, root), (28, 28, 1), 64):
            assert isinstance(item, ImageBatch), item
            for i, key in enumerate(item.keys):
                got[key] = (item.images[i], int(item.labels[i]) if item.has_label[i] else None)
    assert sorted(got) == sorted(expected)
    for key, (image, label) in got.items():
        assert np.array_equal(image, expected[key]), key
        if fmt != "png":  # PNG files carry no label
            assert label == int(mnist[1][keys_for(N).index(key)])
