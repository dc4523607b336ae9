"""Bring your dataset: datasets written by the libraries users run (TensorFlow Datasets,
Hugging Face `datasets`, `webdataset`, img2dataset's writers) encode with every image accounted
for and the producer's own keys and labels, and decoded outputs open in `datasets` and
`webdataset`. Every dataset here is made by the producer itself, offline, from generated images."""
import glob
import io
import os

import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from pipeline import decode, encode, latents
from pipeline.completion import read_manifest
from pipeline.errors import LatentpackError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations: no update check
N = 24
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist[0][:N], mnist[1][:N]


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def rows_of(out):
    manifest = read_manifest(out)
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(latents.part_paths(out, manifest)).read().sort_by("key")
    return manifest, dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist()))


def run_encode(input_, fmt, model_dir, out, *extra):
    return encode.run(["--input", input_, "--input-format", fmt, "--model-dir", model_dir, "--output", str(out)]
                      + list(extra) + BEAM_TEST_ARGS)


# ---------------------------------------------------------------- TensorFlow Datasets

tfds = pytest.importorskip("tensorflow_datasets")


def prepare_tfds(data_dir, digits, file_format):
    """A TFDS dataset of the digits (an Image and a ClassLabel feature), prepared by TFDS itself."""
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(28, 28, 1)),
                                           "label": tfds.features.ClassLabel(names=NAMES)})
    examples = [(i, {"image": image, "label": int(label)}) for i, (image, label) in enumerate(zip(*digits))]
    return tfds.dataset_builders.store_as_tfds_dataset(
        name="latentpack_tiny_digits", version="1.0.0", features=features, split_datasets={"train": examples},
        data_dir=str(data_dir), file_format=file_format, disable_shuffling=True)


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_prepared_dataset_keeps_tfds_ids_and_labels(tmp_path, digits, model_dir, file_format):
    builder = prepare_tfds(tmp_path / "tfds", digits, file_format)
    shards = os.path.join(builder.data_dir, f"latentpack_tiny_digits-train.{file_format}*")
    manifest = run_encode(shards, "tfds", model_dir, tmp_path / "lat")
    rows = rows_of(tmp_path / "lat")[1]
    assert manifest["counts"] == {"read": N, "written": N, "dead_lettered": 0, "dead_lettered_by_reason": {}}
    assert manifest["label_names"] == NAMES
    # What TFDS itself says of every record: its id and its label.
    if file_format == "tfrecord":
        ds = builder.as_dataset(split="train", read_config=tfds.ReadConfig(add_tfds_id=True))
        expected = {ex["tfds_id"].decode(): int(ex["label"]) for ex in tfds.as_numpy(ds)}
    else:  # ArrayRecord is read by index (Grain's way): the id is the shard file and the index
        (shard,) = glob.glob(shards)
        source = builder.as_data_source(split="train")
        expected = {f"{os.path.basename(shard)}__{i}": int(source[i]["label"]) for i in range(len(source))}
    assert rows == expected


def test_tfds_records_read_as_plain_tfrecord_are_detected(tmp_path, digits, model_dir):
    """The same TFDS shards through the generic reader: `image` and `label` found without options."""
    builder = prepare_tfds(tmp_path / "tfds", digits, "tfrecord")
    shards = os.path.join(builder.data_dir, "latentpack_tiny_digits-train.tfrecord*")
    manifest = run_encode(shards, "tfrecord", model_dir, tmp_path / "lat")
    assert manifest["counts"]["written"] == N
    assert sorted(rows_of(tmp_path / "lat")[1].values()) == sorted(digits[1].tolist())
    # A wrong name is one error listing what the records have.
    with pytest.raises(LatentpackError, match=r"no bytes feature 'pixels' for the image \(the records have: "
                                              r"image \(bytes\), label \(int64\)\)"):
        run_encode(shards, "tfrecord", model_dir, tmp_path / "lat2", "--image-feature", "pixels")


def test_tfds_without_or_with_a_broken_features_file_is_one_error(tmp_path, digits, model_dir):
    builder = prepare_tfds(tmp_path / "tfds", digits, "tfrecord")
    shards = os.path.join(builder.data_dir, "latentpack_tiny_digits-train.tfrecord*")
    features = os.path.join(builder.data_dir, "features.json")
    with open(features, "w") as f:
        f.write("{not json")
    with pytest.raises(LatentpackError, match="is not a TFDS features file"):
        run_encode(shards, "tfds", model_dir, tmp_path / "lat")
    os.remove(features)
    with pytest.raises(LatentpackError, match="has no features.json: not a dataset prepared by TensorFlow Datasets"):
        run_encode(shards, "tfds", model_dir, tmp_path / "lat")


def test_decoded_parquet_opens_in_datasets_with_image_and_class_label(tmp_path, digits, model_dir):
    datasets = pytest.importorskip("datasets")
    builder = prepare_tfds(tmp_path / "tfds", digits, "tfrecord")
    shards = os.path.join(builder.data_dir, "latentpack_tiny_digits-train.tfrecord*")
    run_encode(shards, "tfds", model_dir, tmp_path / "lat")
    out = tmp_path / "parquet"
    manifest = decode.run(["--input", str(tmp_path / "lat"), "--model-dir", model_dir, "--output", str(out),
                           "--output-format", "parquet"] + BEAM_TEST_ARGS)
    files = [str(out / f) for f in manifest["files"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel) and ds.features["label"].names == NAMES
    assert len(ds) == N
    first = ds[0]
    assert first["image"].size == (28, 28) and first["key"].startswith("latentpack_tiny_digits-train.tfrecord")


# ---------------------------------------------------------------- Hugging Face datasets

def hf_dataset(digits):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(x[..., 0]) for x in digits[0]],
                                       "label": [int(y) for y in digits[1]]}, features=features)


def test_hugging_face_save_to_disk(tmp_path, digits, model_dir):
    ds = hf_dataset(digits)
    ds.save_to_disk(str(tmp_path / "hf"))
    manifest = run_encode(str(tmp_path / "hf" / "*.arrow"), "huggingface", model_dir, tmp_path / "lat")
    assert manifest["counts"]["written"] == N and manifest["label_names"] == NAMES
    rows = rows_of(tmp_path / "lat")[1]
    (arrow,) = glob.glob(str(tmp_path / "hf" / "*.arrow"))
    stem = os.path.splitext(os.path.basename(arrow))[0]
    assert rows == {f"{stem}:{i}": int(y) for i, y in enumerate(digits[1])}


def test_a_save_to_disk_folder_is_an_input_and_a_missing_file_an_error(tmp_path, digits, model_dir, capsys):
    """`--input` a save_to_disk folder itself, no --input-format (told from state.json); a folder
    whose state.json lists a file that is gone is one error, not half a dataset."""
    from latentpack import cli

    datasets = pytest.importorskip("datasets")
    ds = hf_dataset(digits)
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    manifest = encode.run(["--input", str(tmp_path / "hf"), "--model-dir", model_dir, "--output",
                           str(tmp_path / "lat")] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == N and manifest["input_format"] == "huggingface"
    assert manifest["label_names"] == NAMES
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))) == N
    os.remove(sorted(glob.glob(str(tmp_path / "hf" / "*.arrow")))[1])
    assert cli.main(["encode", "--input", str(tmp_path / "hf"), "--model-dir", model_dir, "--output",
                     str(tmp_path / "lat2")] + BEAM_TEST_ARGS) == 2
    err = capsys.readouterr().err
    assert "is listed in state.json but missing" in err and not os.path.exists(tmp_path / "lat2")


def test_hugging_face_parquet(tmp_path, digits, model_dir):
    ds = hf_dataset(digits)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    manifest = run_encode(str(tmp_path / "train.parquet"), "parquet", model_dir, tmp_path / "lat")
    assert manifest["counts"]["written"] == N and manifest["label_names"] == NAMES
    assert rows_of(tmp_path / "lat")[1] == {f"train:{i}": int(y) for i, y in enumerate(digits[1])}


# ---------------------------------------------------------------- WebDataset and img2dataset

def test_webdataset_shard_writer_round_trip(tmp_path, digits, model_dir):
    wds = pytest.importorskip("webdataset")
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "shard-%04d.tar"), maxcount=10) as sink:
        for i, (image, label) in enumerate(zip(*digits)):
            sink.write({"__key__": f"sample{i:04d}", "png": png(image), "cls": int(label)})
    manifest = run_encode(str(tmp_path / "wds" / "shard-*.tar"), "webdataset", model_dir, tmp_path / "lat")
    assert manifest["counts"]["written"] == N
    assert rows_of(tmp_path / "lat")[1] == {f"sample{i:04d}": int(y) for i, y in enumerate(digits[1])}

    out = tmp_path / "decoded"
    decoded = decode.run(["--input", str(tmp_path / "lat"), "--model-dir", model_dir, "--output", str(out),
                          "--output-format", "webdataset"] + BEAM_TEST_ARGS)
    urls = [str(out / f) for f in decoded["files"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("l"))
    assert {s["__key__"]: int(s["cls"]) for s in samples} == {f"sample{i:04d}": int(y)
                                                              for i, y in enumerate(digits[1])}
    assert all(s["png"].shape == (28, 28) for s in samples)


def img2dataset_schema():
    import pyarrow as pa

    return pa.schema([pa.field("key", pa.string()), pa.field("url", pa.string()), pa.field("status", pa.string()),
                      pa.field("error_message", pa.string()), pa.field("width", pa.int32()),
                      pa.field("height", pa.int32())])


def img2dataset_meta(i):
    return {"key": f"{i:09d}", "url": f"https://example.com/{i}.jpg", "status": "success", "error_message": None,
            "width": 28, "height": 28}


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_img2dataset_output_folders(tmp_path, digits, model_dir, output_format):
    writer = pytest.importorskip("img2dataset.writer")
    cls = writer.WebDatasetSampleWriter if output_format == "webdataset" else writer.ParquetSampleWriter
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    for shard in range(2):
        w = cls(shard, str(folder), True, 5, img2dataset_schema(), "jpg")
        for i in range(shard * N // 2, (shard + 1) * N // 2):
            buf = io.BytesIO()
            Image.fromarray(digits[0][i][..., 0]).save(buf, format="JPEG", quality=95)
            w.write(buf.getvalue(), f"{i:09d}", f"a digit {digits[1][i]}", img2dataset_meta(i))
        w.close()
    pattern = str(folder / ("*.tar" if output_format == "webdataset" else "*.parquet"))
    manifest = run_encode(pattern, output_format, model_dir, tmp_path / "lat")
    assert manifest["counts"] == {"read": N, "written": N, "dead_lettered": 0, "dead_lettered_by_reason": {}}
    # img2dataset's keys; it has captions, not labels.
    assert rows_of(tmp_path / "lat")[1] == {f"{i:09d}": None for i in range(N)}
    # Its captions and metadata are kept beside the codes, and given back.
    import pyarrow.parquet as pq

    table = pq.ParquetDataset(latents.part_paths(str(tmp_path / "lat"), read_manifest(str(tmp_path / "lat")))).read()
    rows = {r["key"]: r for r in table.to_pylist()}
    captions = {f"{i:09d}": f"a digit {digits[1][i]}" for i in range(N)}
    if output_format == "parquet":  # (img2dataset's Parquet holds its schema's columns, not the caption)
        assert all(r["url"] == f"https://example.com/{int(k)}.jpg" and r["status"] == "success"
                   and r["height"] == 28 for k, r in rows.items())
        return
    import json

    for key, row in rows.items():
        members = dict(row["members"])
        assert members["txt"].decode() == captions[key] and json.loads(members["json"])["url"].endswith(f"/{int(key)}.jpg")
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "decoded"
    decoded = decode.run(["--input", str(tmp_path / "lat"), "--model-dir", model_dir, "--output", str(out),
                          "--output-format", "webdataset"] + BEAM_TEST_ARGS)
    samples = list(wds.WebDataset([str(out / f) for f in decoded["files"]], shardshuffle=False))
    assert {s["__key__"]: s["txt"].decode() for s in samples} == captions
    assert all(json.loads(s["json"])["status"] == "success" and "png" in s for s in samples)


def test_parquet_column_options_and_errors(tmp_path, digits, model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"x{i}" for i in range(N)], "pixels": [png(x) for x in digits[0]],
                      "thumb": [png(x[::2, ::2]) for x in digits[0]], "digit": digits[1].tolist()})
    pq.write_table(table, tmp_path / "t.parquet")
    manifest = run_encode(str(tmp_path / "t.parquet"), "parquet", model_dir, tmp_path / "lat", "--image-feature",
                          "pixels", "--label-feature", "digit", "--key-feature", "id")
    assert manifest["counts"]["written"] == N
    assert rows_of(tmp_path / "lat")[1] == {f"x{i}": int(y) for i, y in enumerate(digits[1])}
    with pytest.raises(LatentpackError, match=r"no column 'label' for the label \(the table has: id \(string\), "
                                              r"pixels \(binary\)"):
        run_encode(str(tmp_path / "t.parquet"), "parquet", model_dir, tmp_path / "lat2", "--label-feature", "label")
    # Hugging Face's {bytes, path} cell without bytes: the image is read from its path, relative to the file.
    (tmp_path / "img").mkdir()
    for i, x in enumerate(digits[0]):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(x))
    cells = [{"bytes": None, "path": f"img/{i}.png"} for i in range(N)]
    cells[5] = {"bytes": None, "path": "img/absent.png"}
    pq.write_table(pa.table({"image": cells, "label": digits[1].tolist()}), tmp_path / "paths.parquet")
    manifest = run_encode(str(tmp_path / "paths.parquet"), "parquet", model_dir, tmp_path / "lat4",
                          "--max-bad-fraction", "0.1")
    assert manifest["counts"]["written"] == N - 1
    assert manifest["counts"]["dead_lettered_by_reason"] == {"missing_image": 1}
    with pytest.raises(LatentpackError, match="do not apply to --input-format npz"):
        run_encode(str(tmp_path / "t.parquet"), "npz", model_dir, tmp_path / "lat3", "--image-feature", "pixels")
