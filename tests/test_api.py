"""The Python API: latentpack.open over datasets the real encode job wrote (a dense model on digits,
the shipped photo:1 on photos), indexing by key, shuffled and sharded iteration, the PyTorch,
tf.data and Hugging Face adapters with the real libraries, and compress/decompress in memory."""
import os

import numpy as np
import pytest
from PIL import Image

import latentpack
from conftest import BEAM_TEST_ARGS
from pipeline import decode, encode
from pipeline.errors import LatentpackError
from pipeline.images import psnr


@pytest.fixture
def digits(shards, rd_model_dir, tmp_path, monkeypatch):
    """The 120 digits of `shards` encoded into 3 parts with row groups of 16 rows (so that lookups,
    shuffles and shards cross row groups and parts)."""
    monkeypatch.setattr("pipeline.latents.parts.ROW_GROUP_ROWS", 16)
    out = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", rd_model_dir, "--output", out, "--num-shards", "3"]
               + BEAM_TEST_ARGS)
    return out


def test_open_indexes_a_dataset_by_key(digits, shards, rd_model_dir):
    ds = latentpack.open(digits, model=rd_model_dir)
    assert len(ds) == 120 and sorted(ds.keys) == sorted(shards.keys) and len(ds._groups) > 3
    assert "digits/0007" in ds and "nope" not in ds
    by_key = dict(zip(ds.keys, ds.labels))
    for i in (0, 7, 61, 119):
        record = ds[shards.keys[i]]
        assert record["key"] == shards.keys[i] and record["label"] == shards.labels[i] == by_key[shards.keys[i]]
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
    with pytest.raises(KeyError):
        ds["nope"]
    assert ds.get("nope", "absent") == "absent"
    # Iteration gives the same pixels as lookups, every key once.
    records = list(ds)
    assert [r["key"] for r in records] == ds.keys
    assert all(np.array_equal(r["image"], ds[r["key"]]["image"]) for r in records[::17])


def test_the_images_are_the_decode_jobs(digits, rd_model_dir, tmp_path):
    out = str(tmp_path / "png")
    decode.run(["--input", digits, "--model-dir", rd_model_dir, "--output", out] + BEAM_TEST_ARGS)
    ds = latentpack.open(digits, model=rd_model_dir)
    for record in ds:
        stored = np.asarray(Image.open(os.path.join(out, record["key"] + ".png")))
        assert np.array_equal(stored, record["image"][..., 0])


def test_shuffled_shards_see_every_row_once_in_a_seeded_order(digits, rd_model_dir):
    ds = latentpack.open(digits, model=rd_model_dir, workers=2)
    plain = [k for b in ds.iter_batches(10) for k in b["keys"]]
    assert plain == ds.keys
    one = [k for b in ds.iter_batches(7, shuffle=True, seed=3) for k in b["keys"]]
    assert sorted(one) == sorted(ds.keys) and one != ds.keys
    assert one == [k for b in ds.iter_batches(32, shuffle=True, seed=3) for k in b["keys"]]  # batch size aside
    assert one != [k for b in ds.iter_batches(7, shuffle=True, seed=3, epoch=1) for k in b["keys"]]
    shards = [[r["key"] for r in ds.records(shuffle=True, seed=3, shard=(i, 3))] for i in range(3)]
    assert sum(len(s) for s in shards) == 120 and len(set().union(*shards)) == 120
    assert [s[j] for j in range(40) for s in shards] == one  # the shards interleave into the one order
    batches = list(ds.iter_batches(50, drop_last=True))
    assert [b["images"].shape for b in batches] == [(50, 28, 28, 1)] * 2
    assert batches[0]["labels"].dtype == np.int64
    with pytest.raises(LatentpackError, match="shard"):
        list(ds.iter_batches(4, shard=(3, 3)))


def test_a_dataloader_with_two_workers_sees_every_image_once(digits, rd_model_dir):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = latentpack.open(digits, model=rd_model_dir)
    loader = ds.torch_loader(batch_size=8, num_workers=2, shuffle=True, seed=5)  # spawned workers
    first = [k for batch in loader for k in batch["keys"]]
    assert sorted(first) == sorted(ds.keys) and first != ds.keys
    assert first == [k for batch in loader for k in batch["keys"]]  # seeded: the same epoch is the same order
    loader.dataset.set_epoch(1)
    second = [k for batch in loader for k in batch["keys"]]
    assert sorted(second) == sorted(ds.keys) and second != first
    batch = next(iter(ds.torch_loader(batch_size=4, num_workers=0)))
    assert batch["images"].dtype == torch.uint8 and tuple(batch["images"].shape) == (4, 28, 28, 1)
    assert np.array_equal(batch["images"][0].numpy(), ds[batch["keys"][0]]["image"])
    assert batch["labels"].tolist() == [ds[k]["label"] for k in batch["keys"]]
    # Forked workers (the default on Linux) would hang in TensorFlow: they stop with the advice.
    forked = DataLoader(ds.to_torch(), batch_size=8, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(Exception, match="spawn"):
        next(iter(forked))


def test_tf_data_and_hugging_face_datasets(digits, rd_model_dir):
    ds = latentpack.open(digits, model=rd_model_dir)
    tf_records = list(ds.to_tf_dataset().as_numpy_iterator())
    assert [r["key"].decode() for r in tf_records] == ds.keys
    assert np.array_equal(tf_records[5]["image"], ds[ds.keys[5]]["image"])
    assert [int(r["label"]) for r in tf_records] == list(ds.labels)
    hf = list(ds.to_hf())
    assert [r["key"] for r in hf] == ds.keys
    assert np.array_equal(np.asarray(hf[3]["image"]), ds[ds.keys[3]]["image"][..., 0])


def test_a_shipped_photo_model_through_the_jobs_and_the_api(real_photos, tmp_path):
    """photo:1 (shipped, a real model) encodes real photos with the CLI job; the API and the decode
    job give the same pixels, close to the photos (a turned or shifted image would be far)."""
    lat, out = str(tmp_path / "lat"), str(tmp_path / "png")
    encode.run(["--input", str(real_photos / "*.png"), "--input-format", "images", "--model-dir", "photo:1",
                "--output", lat] + BEAM_TEST_ARGS)
    decode.run(["--input", lat, "--output", out] + BEAM_TEST_ARGS)  # the model found by its fingerprint
    ds = latentpack.open(lat)
    assert len(ds) == 3 and ds.spec.family in ("hyperprior", "channelwise")
    for key in ("chelsea", "coffee", "camera"):
        source = np.asarray(Image.open(real_photos / f"{key}.png"))
        image = ds[key]["image"]
        assert np.array_equal(image, np.asarray(Image.open(os.path.join(out, key + ".png"))).reshape(image.shape))
        assert image.shape == source.shape[:2] + (3 if source.ndim == 3 else 1,)
        source = source.reshape(image.shape)
        quality = psnr(source[None], image[None])[0]
        assert quality > 25, (key, quality)
        assert quality > psnr(source[None], image[::-1, ::-1][None])[0] + 8
        assert quality > psnr(source[None], np.roll(image, 1, axis=1)[None])[0] + 1
    batch = next(ds.iter_batches(3))
    assert len(batch["keys"]) == 3


def test_compress_and_decompress_arrays_in_memory(real_photos):
    images = [np.asarray(Image.open(real_photos / f"{n}.png")) for n in ("chelsea", "coffee")]
    images.append(images[0][:61, :97])
    codes = latentpack.compress(images + [images[0][..., 0]], model="photo:1")
    assert len(codes) == 4 and 0 < codes.bits_per_pixel < 4
    back = latentpack.decompress(codes)
    assert [b.shape for b in back] == [im.shape for im in images] + [images[0].shape[:2] + (1,)]
    assert all(psnr(a[None], b[None])[0] > 25 for a, b in zip(images, back))
    assert psnr(images[0][..., :1][None], back[3][None])[0] > 25
    with pytest.raises(LatentpackError, match="made with model"):
        latentpack.decompress(codes, model="photo:2")
    with pytest.raises(LatentpackError, match="uint8"):
        latentpack.compress([images[0].astype(np.float32)], model="photo:1")
