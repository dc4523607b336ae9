"""A table input's other columns (captions, ids, tags, a second number) are kept beside the codes:
in every latent part with their types, given back by decode's Parquet output, by `latentpack.open`
and its adapters; nothing of the user's table is dropped. Datasets are made by `datasets` itself."""
import glob
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS, smooth_photos
from pipeline import decode, encode, latents
from pipeline.completion import read_manifest

N = 12


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def captioned(digits, datasets):
    """A Hugging Face dataset as users keep them: image, class label, caption, an id, tags, a score,
    and a column named like one the latent parts have themselves (`height`)."""
    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        "caption": datasets.Value("string"), "id": datasets.Value("int64"),
        "tags": datasets.Sequence(datasets.Value("string")), "score": datasets.Value("float32"),
        "height": datasets.Value("int32")})
    return datasets.Dataset.from_dict({
        "image": [Image.fromarray(x[..., 0]) for x in digits[0]], "label": [int(y) for y in digits[1]],
        "caption": [f"a handwritten {int(y)}" for y in digits[1]], "id": [1000 + i for i in range(N)],
        "tags": [["digit"] * (i % 3) for i in range(N)], "score": [i / 8 for i in range(N)],
        "height": [28] * N}, features=features)


def part_rows(lat):
    """Every part's rows in one table (a part stores only the extra columns it holds values of)."""
    tables = [pq.read_table(p) for p in latents.part_paths(str(lat), read_manifest(str(lat)))]
    return pa.concat_tables(tables, promote_options="default").sort_by("key")


def test_a_hugging_face_parquet_keeps_its_other_columns_through_encode_and_decode(tmp_path, mnist, model_dir):
    datasets = pytest.importorskip("datasets")
    digits = mnist[0][:N], mnist[1][:N]
    captioned(digits, datasets).to_parquet(str(tmp_path / "train.parquet"))
    lat = tmp_path / "lat"
    manifest = encode.run(["--input", str(tmp_path / "train.parquet"), "--input-format", "parquet",
                           "--model-dir", model_dir, "--output", str(lat)] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == N
    assert manifest["extra_columns"] == ["caption", "id", "tags", "score", "height"]
    table = part_rows(lat)
    # The parts hold them with their types; `height` is the photo families' column name, stored
    # as source_height (this dense model has no height column, but the name is kept apart all the same).
    schema = table.schema
    assert schema.field("caption").type == pa.string() and schema.field("id").type == pa.int64()
    assert schema.field("tags").type == pa.list_(pa.string()) and schema.field("score").type == pa.float32()
    keys = [f"train:{i}" for i in range(N)]
    expected = {k: {"caption": f"a handwritten {int(digits[1][i])}", "id": 1000 + i,
                    "tags": ["digit"] * (i % 3), "score": i / 8, "height": 28} for i, k in enumerate(keys)}
    stored_height = "source_height" if "source_height" in schema.names else "height"
    for row in table.to_pylist():
        want = expected[row["key"]]
        assert [row["caption"], row["id"], row["tags"], row["score"], row[stored_height]] == \
               [want["caption"], want["id"], want["tags"], want["score"], want["height"]]
    # decode --output-format parquet gives them back, and `datasets` opens them typed.
    out = tmp_path / "out"
    decode.run(["--input", str(lat), "--output", str(out), "--output-format", "parquet"] + BEAM_TEST_ARGS)
    back = datasets.load_dataset("parquet", data_files=sorted(glob.glob(str(out / "*.parquet"))), split="train")
    assert back.features["caption"] == datasets.Value("string") and back.features["id"] == datasets.Value("int64")
    assert back.features["score"] == datasets.Value("float32") and back.features["height"] == datasets.Value("int32")
    got = {r["key"]: r for r in back}
    assert sorted(got) == sorted(keys)
    for key, want in expected.items():
        assert {name: got[key][name] for name in want} == want
        assert np.asarray(got[key]["image"]).shape == (28, 28)
    # The Python API: records, batches and the Hugging Face adapter carry them too.
    import latentpack

    ds = latentpack.open(str(lat))
    assert [f.name for f in ds.extra_fields] == ["caption", "id", "tags", "score", "height"]
    record = ds["train:5"]
    assert {name: record[name] for name in expected["train:5"]} == expected["train:5"]
    batch = next(ds.iter_batches(batch_size=4))
    assert batch["caption"] == [expected[k]["caption"] for k in batch["keys"]]
    hf = ds.to_hf()
    assert hf.features["tags"] == back.features["tags"] and hf.features["score"] == datasets.Value("float32")
    first = next(iter(hf))
    assert {name: first[name] for name in expected[first["key"]]} == expected[first["key"]]
    # tf.data: the scalar columns (lists have no fixed signature there).
    element = next(iter(ds.to_tf_dataset()))
    key = element["key"].numpy().decode()
    assert set(element) == {"key", "image", "label", "caption", "id", "score", "height"}
    assert element["caption"].numpy().decode() == expected[key]["caption"] and int(element["id"]) == expected[key]["id"]
    assert float(element["score"]) == pytest.approx(expected[key]["score"])


def test_a_photo_parquet_keeps_them_where_a_column_is_missing_or_named_like_ours(tmp_path, hyperprior_model_dir,
                                                                                 caplog):
    """Photos of several sizes (regrouped by size inside the job) keep each row's own values; a
    file that lacks a column gives nulls there; a column named like one the latent parts have
    (height, label as text) is stored apart and given back under its own name where it can be."""
    images = smooth_photos(np.random.default_rng(3), 8)
    rows = [{"image": {"bytes": png(im), "path": None}, "label": str(i % 2 == 0), "note": f"n{i}",
             "height": float(i)} for i, im in enumerate(images)]
    first = pa.Table.from_pylist(rows[:5])
    pq.write_table(first, tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]).drop(["note"]), tmp_path / "b.parquet")
    lat = tmp_path / "lat"
    manifest = encode.run(["--input", str(tmp_path / "*.parquet"), "--input-format", "parquet",
                           "--model-dir", hyperprior_model_dir, "--output", str(lat)] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 8
    table = part_rows(lat)
    assert {"source_label", "source_height", "note", "height", "label"} <= set(table.schema.names)
    by_key = {r["key"]: r for r in table.to_pylist()}
    for i in range(8):
        row = by_key[f"{'a' if i < 5 else 'b'}:{i if i < 5 else i - 5}"]
        assert row["label"] is None  # a text column is not a class label
        assert row["source_label"] == str(i % 2 == 0) and row["source_height"] == float(i)
        assert row["note"] == (f"n{i}" if i < 5 else None)
        assert row["height"] == images[i].shape[0]  # the photo's own height, untouched
    out = tmp_path / "out"
    decode.run(["--input", str(lat), "--output", str(out), "--output-format", "parquet"] + BEAM_TEST_ARGS)
    back = {r["key"]: r for f in sorted(glob.glob(str(out / "*.parquet"))) for r in pq.read_table(f).to_pylist()}
    assert back["a:3"]["height"] == 3.0 and back["a:3"]["source_label"] == "False" and back["a:3"]["note"] == "n3"
    assert back["b:1"]["height"] == 6.0 and back["b:1"].get("note") is None
    # Another output format has no place for them: said, not silent.
    with caplog.at_level(logging.WARNING, logger="latentpack"):
        decode.run(["--input", str(lat), "--output", str(tmp_path / "png")] + BEAM_TEST_ARGS)
    assert ("the dataset keeps the input's other column(s) label, note, height beside the codes (where the input "
            "had any); --output-format png has no place for them (--output-format parquet writes them back") \
        in caplog.text


def test_a_column_whose_type_differs_in_another_file_is_a_bad_column_dead_letter(tmp_path, hyperprior_model_dir):
    """The columns' types come from the first file; another file whose column converts (int32 to
    int64) is kept, one whose column cannot (text where the first had numbers) makes its rows
    `bad_column` dead letters naming the column, never a failed job or values silently nulled."""
    images = smooth_photos(np.random.default_rng(4), 6)
    pq.write_table(pa.table({"image": [png(im) for im in images[:2]], "id": pa.array([1, 2], pa.int64())}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": [png(im) for im in images[2:4]], "id": pa.array([3, 4], pa.int32())}),
                   tmp_path / "b.parquet")
    pq.write_table(pa.table({"image": [png(im) for im in images[4:]], "id": ["five", "six"]}), tmp_path / "c.parquet")
    lat = tmp_path / "lat"
    manifest = encode.run(["--input", str(tmp_path / "*.parquet"), "--input-format", "parquet", "--model-dir",
                           hyperprior_model_dir, "--output", str(lat), "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 4 and manifest["counts"]["dead_lettered_by_reason"] == {"bad_column": 2}
    assert sorted(r["id"] for r in part_rows(lat).to_pylist()) == [1, 2, 3, 4]
    letters = [json.loads(line) for f in glob.glob(str(lat / "dead_letter" / "*.jsonl")) for line in open(f)]
    assert sorted(d["key"] for d in letters) == ["c:0", "c:1"]
    assert all(d["reason"] == "bad_column" and "'id' is string here, int64 in the first input file" in d["error"]
               for d in letters)


def test_a_tfrecord_examples_other_features_are_kept_and_written_back(tmp_path, mnist, model_dir, shards, caplog):
    """TF-slim Examples carry image/height, image/width, image/format, image/filename and a box
    list beside the image: kept (one serialized Example per row, `features`), written back by
    decode's TFRecord output with image/format saying png, and given by `latentpack.open`. A
    TFRecord input with nothing besides image, key and label keeps nothing and says nothing."""
    from tensorflow.core.example import example_pb2

    from pipeline import tfrecord

    images, labels = mnist[0][:N], mnist[1][:N]
    records = []
    for i in range(N):
        ex = example_pb2.Example.FromString(tfrecord.make_example(png(images[i]), f"d{i:02d}", int(labels[i])))
        feat = ex.features.feature
        feat["image/height"].int64_list.value.append(28)
        feat["image/width"].int64_list.value.append(28)
        feat["image/format"].bytes_list.value.append(b"jpeg")
        feat["image/filename"].bytes_list.value.append(f"scan-{i}.jpg".encode())
        feat["image/object/bbox/xmin"].float_list.value.extend([0.25, 0.5 + i / 100])
        records.append(ex.SerializeToString())
    with open(tmp_path / "in.tfrecord", "wb") as f:
        f.write(b"".join(tfrecord.frame(r) for r in records))
    lat = tmp_path / "lat"
    manifest = encode.run(["--input", str(tmp_path / "in.tfrecord"), "--input-format", "tfrecord",
                           "--model-dir", model_dir, "--output", str(lat)] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == N and manifest["extra_columns"] == ["features"]
    stored = {r["key"]: example_pb2.Example.FromString(r["features"]) for r in part_rows(lat).to_pylist()}
    assert sorted(stored["d03"].features.feature) == ["image/filename", "image/format", "image/height",
                                                      "image/object/bbox/xmin", "image/width"]
    out = tmp_path / "out"
    decoded = decode.run(["--input", str(lat), "--output", str(out), "--output-format", "tfrecord"] + BEAM_TEST_ARGS)
    back = {}
    for name in decoded["files"]:
        with open(out / name, "rb") as f:
            for _, record in tfrecord.read_records(f):
                ex = example_pb2.Example.FromString(record)
                back[ex.features.feature["image/key"].bytes_list.value[0].decode()] = ex.features.feature
    assert sorted(back) == [f"d{i:02d}" for i in range(N)]
    for i in range(N):
        feat = back[f"d{i:02d}"]
        assert feat["image/filename"].bytes_list.value[0] == f"scan-{i}.jpg".encode()
        assert list(feat["image/object/bbox/xmin"].float_list.value) == pytest.approx([0.25, 0.5 + i / 100])
        assert feat["image/format"].bytes_list.value == [b"png"]  # what the decoded image is
        assert feat["image/class/label"].int64_list.value[0] == int(labels[i])
        assert feat["image/encoded"].bytes_list.value[0].startswith(b"\x89PNG")
    import latentpack

    assert example_pb2.Example.FromString(latentpack.open(str(lat))["d05"]["features"]).features.feature[
        "image/filename"].bytes_list.value[0] == b"scan-5.jpg"
    # Plain shards (image, key, label only): no extra column is reported, and decoding says nothing.
    plain = encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", str(tmp_path / "plain")]
                       + BEAM_TEST_ARGS)
    assert "extra_columns" not in plain
    with caplog.at_level(logging.WARNING, logger="latentpack"):
        decode.run(["--input", str(tmp_path / "plain"), "--output", str(tmp_path / "png")] + BEAM_TEST_ARGS)
    assert "other column" not in caplog.text


def test_a_nightly_run_keeps_the_extra_columns_of_earlier_parts_and_names_stay_put(tmp_path, hyperprior_model_dir,
                                                                                   caplog):
    """--skip-existing: tonight's file has no caption column; the manifest still lists the caption
    that last night's part holds, and each part keeps what it holds. Dropping a column a part holds
    no values of never renames the others (`source_<name>` stays what it was among all of them)."""
    from pipeline.latents import schema

    images = smooth_photos(np.random.default_rng(5), 4)
    pq.write_table(pa.table({"image": [png(im) for im in images[:2]], "caption": ["a", "b"]}), tmp_path / "a.parquet")
    lat = tmp_path / "lat"
    args = ["--input-format", "parquet", "--model-dir", hyperprior_model_dir, "--output", str(lat),
            "--skip-existing"] + BEAM_TEST_ARGS
    first = encode.run(["--input", str(tmp_path / "*.parquet")] + args)
    assert first["extra_columns"] == ["caption"]
    pq.write_table(pa.table({"image": [png(im) for im in images[2:]], "id": [7, 8]}), tmp_path / "b.parquet")
    with caplog.at_level(logging.WARNING, logger="latentpack"):
        second = encode.run(["--input", str(tmp_path / "*.parquet")] + args)
    assert second["counts"]["written"] == 4 and second["extra_columns"] == ["caption"]
    rows = {r["key"]: r for r in part_rows(lat).to_pylist()}
    assert rows["a:1"]["caption"] == "b" and rows["b:0"].get("caption") is None
    # b's `id` is not kept (the columns are the first input file's, a.parquet's), and the log says so.
    assert "b.parquet: column(s) id are not kept: the dataset keeps the columns of the first input file" in caplog.text
    assert "id" not in part_rows(lat).schema.names
    fields = [pa.field("height", pa.string()), pa.field("source_height", pa.string())]
    every = schema([pa.field("height", pa.int32())], {}, "f", "code", fields)
    some = schema([pa.field("height", pa.int32())], {}, "f", "code", fields, held={"source_height"})
    assert every.names[-2:] == ["source_height", "source_source_height"]
    assert some.names[-1:] == ["source_source_height"] and "source_height" not in some.names
