import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from latentpack import cli
from pipeline import decode, encode, latents
from pipeline.codec import load_codec
from pipeline.formats import get_reader
from pipeline.errors import LatentpackError
from pipeline.outputs import safe_relative_path


@pytest.fixture
def dataset(shards, model_dir, tmp_path):
    out = str(tmp_path / "latents")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS)
    return out


def test_decode_to_png_matches_the_model(dataset, model_dir, shards, tmp_path):
    out = str(tmp_path / "png")
    manifest = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 120 and manifest["counts"]["dead_lettered"] == 0
    codec = load_codec(model_dir)
    expected = codec.decode(codec.encode(shards.images))
    for i in (0, 57, 119):
        got = np.asarray(Image.open(os.path.join(out, shards.keys[i] + ".png")))
        assert np.array_equal(got, expected[i, ..., 0])
    assert len(glob.glob(f"{out}/digits/*.png")) == 120


def test_partial_decode_by_keys_file_and_limit(dataset, model_dir, shards, tmp_path, capsys):
    out = str(tmp_path / "some")
    manifest = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", out,
                           "--keys", shards.keys[3], shards.keys[80], shards.keys[3]] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 2 and manifest["selected_keys"] == 2
    assert sorted(glob.glob(f"{out}/digits/*.png")) == sorted(f"{out}/{shards.keys[i]}.png" for i in (3, 80))
    listed = tmp_path / "keys.txt"
    listed.write_text("\n".join(shards.keys[10:15]) + "\n")
    manifest = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", str(tmp_path / "file"),
                           "--keys-file", str(listed)] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 5
    manifest = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", str(tmp_path / "first"),
                           "--limit", "7", "--output-format", "npz"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 7
    # A key the dataset lacks is one clear error before anything is written.
    assert cli.main(["decode", "--input", dataset, "--model-dir", model_dir, "--output", str(tmp_path / "none"),
                     "--keys", shards.keys[0], "digits/nope"] + BEAM_TEST_ARGS) == 2
    err = capsys.readouterr().err
    assert "latentpack: error: --keys: 1 key(s) not in the dataset: 'digits/nope'" in err
    assert not os.path.exists(tmp_path / "none")
    assert cli.main(["decode", "--input", dataset, "--output", str(tmp_path / "none"), "--limit", "0"]) == 2


def test_a_rerun_deletes_only_what_an_earlier_decode_recorded(dataset, model_dir, shards, tmp_path):
    """A re-run replaces the shards its earlier run's manifest lists, never a file of the user's
    that only looks like one; another dataset's decode is refused in an earlier decode's folder."""
    out = str(tmp_path / "out")
    first = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", out, "--output-format", "npz"]
                       + BEAM_TEST_ARGS)
    ours = sorted(os.path.join(out, f) for f in first["files"])
    assert ours and all(os.path.exists(p) for p in ours)
    mine = os.path.join(out, "images-mine.tfrecord")
    with open(mine, "wb") as f:
        f.write(b"the user's own shard")
    stale = os.path.join(out, "images-00000-of-00009.npz.tmp")  # a writer's file from a killed run
    with open(stale, "wb") as f:
        f.write(b"half a shard")
    second = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", out, "--output-format", "npz"]
                        + BEAM_TEST_ARGS)
    assert open(mine, "rb").read() == b"the user's own shard"
    assert not os.path.exists(stale)
    assert sorted(os.path.join(out, f) for f in second["files"]) == ours
    other = str(tmp_path / "other")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", other] + BEAM_TEST_ARGS)
    with pytest.raises(LatentpackError, match="holds the decode of another dataset"):
        decode.run(["--input", other, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS)
    assert all(os.path.exists(p) for p in ours)


def test_decode_to_tfrecord_is_readable_by_the_encoder(dataset, model_dir, shards, tmp_path):
    out = str(tmp_path / "tfr")
    manifest = decode.run(["--input", dataset, "--model-dir", model_dir, "--output", out,
                           "--output-format", "tfrecord"] + BEAM_TEST_ARGS)
    assert manifest["files"] and manifest["counts"]["written"] == 120
    reader = get_reader("tfrecord")
    paths, root = reader.match(f"{out}/*.tfrecord")
    records = sorted((r for p in paths for r in reader.read(p, root)), key=lambda r: r.key)
    assert [r.key for r in records] == shards.keys
    assert [r.label for r in records] == shards.labels.tolist()


def test_fingerprint_mismatch_is_refused(dataset, model_dir, tmp_path, capsys):
    other = str(tmp_path / "other-model")
    shutil.copytree(model_dir, other)
    spec = json.load(open(f"{other}/codec.json"))
    spec["training"]["note"] = "retrained"
    json.dump(spec, open(f"{other}/codec.json", "w"))
    from pipeline.artifact import compute_fingerprint
    spec["fingerprint"] = compute_fingerprint(other)
    json.dump(spec, open(f"{other}/codec.json", "w"))
    rc = cli.main(["decode", "--input", dataset, "--model-dir", other, "--output", str(tmp_path / "x")]
                  + BEAM_TEST_ARGS)
    assert rc == 2
    err = capsys.readouterr().err
    assert "different model" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x" / "_manifest.json")


def test_incomplete_dataset_is_refused(dataset, model_dir, tmp_path):
    os.remove(os.path.join(dataset, latents.MANIFEST))
    with pytest.raises(LatentpackError, match="not a complete latent dataset"):
        decode.run(["--input", dataset, "--model-dir", model_dir, "--output", str(tmp_path / "x")])


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a/../../b", "a//b", "", "c:\\x", "./a"])
def test_unsafe_keys_are_rejected(key):
    with pytest.raises(ValueError):
        safe_relative_path(key)


def test_unsafe_key_goes_to_dead_letters(tmp_path, model_dir, mnist):
    from conftest import write_tfrecord
    write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:3], keys=["fine/one", "../../etc/evil", "fine/two"])
    lat, png = str(tmp_path / "lat"), str(tmp_path / "png")
    encode.run(["--input", str(tmp_path / "s.tfrecord"), "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    manifest = decode.run(["--input", lat, "--model-dir", model_dir, "--output", png,
                           "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)
    assert manifest["counts"] == {"read": 3, "written": 2, "dead_lettered": 1,
                                  "dead_lettered_by_reason": {"unsafe_key": 1}}
    assert sorted(os.listdir(f"{png}/fine")) == ["one.png", "two.png"]
    assert not os.path.exists(tmp_path / "etc")


def test_decoding_again_into_the_same_folder_leaves_no_stale_shards(model_dir, tmp_path, mnist):
    """The dataset re-encoded into fewer parts, decoded again into the same folder: the earlier
    run's shards (its manifest lists them) are gone, only the new ones remain."""
    from conftest import write_tfrecord
    other = tmp_path / "other"
    other.mkdir()
    for s in range(3):
        write_tfrecord(other / f"o{s}.tfrecord", mnist[0][2 * s:2 * s + 2], keys=[f"o/{2 * s + i}" for i in range(2)])
    lat, out = str(tmp_path / "lat2"), str(tmp_path / "npz")
    encode.run(["--input", str(other / "o*.tfrecord"), "--model-dir", model_dir, "--output", lat,
                "--num-shards", "3"] + BEAM_TEST_ARGS)
    first = decode.run(["--input", lat, "--model-dir", model_dir, "--output", out, "--output-format", "npz"]
                       + BEAM_TEST_ARGS)
    encode.run(["--input", str(other / "o*.tfrecord"), "--model-dir", model_dir, "--output", lat,
                "--num-shards", "1"] + BEAM_TEST_ARGS)
    manifest = decode.run(["--input", lat, "--model-dir", model_dir, "--output", out, "--output-format", "npz"]
                          + BEAM_TEST_ARGS)
    files = sorted(f for f in os.listdir(out) if f.endswith(".npz"))
    assert files == sorted(manifest["files"]) and len(first["files"]) > len(files)
    keys = [k for f in files for k in np.load(os.path.join(out, f))["keys"].tolist()]
    assert sorted(keys) == [f"o/{i}" for i in range(6)]


def test_decode_part_writes_every_batch_before_it_reports(tmp_path, model_dir, mnist):
    """The writer thread lags the model by up to `max_pending` batches: every file is on disk and
    counted when the part's summary comes out, and a key that cannot be a file is a dead letter
    with its reason, never a silently missing image."""
    from conftest import write_tfrecord
    from pipeline import completion, latents
    from pipeline.artifact import read_spec
    from pipeline.decode import DecodePart

    keys = [f"b{i // 7}/{i % 7}" for i in range(63)]
    keys[30] = "../escape"
    write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:63], keys=keys)
    lat = str(tmp_path / "lat")
    encode.run(["--input", str(tmp_path / "s.tfrecord"), "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    manifest = completion.read_manifest(lat)
    (part,) = latents.part_paths(lat, manifest)
    spec = read_spec(model_dir)

    def decode_part(out):
        fn = DecodePart(model_dir, spec, out, "png", max_pending=2)
        fn.BATCH_ROWS = 5  # many batches in flight
        fn.setup()
        (summary,) = fn.process((part, {"entry": [manifest["files"][0]], "later": []}))
        fn.teardown()
        letters = [json.loads(line) for line in open(summary["dead_letters"])]
        return summary, letters

    out = str(tmp_path / "png")
    summary, letters = decode_part(out)
    assert summary["written"] == 62 and summary["reasons"] == {"unsafe_key": 1}
    assert [(d["key"], d["reason"]) for d in letters] == [("../escape", "unsafe_key")]
    assert len(glob.glob(f"{out}/*/*.png")) == 62
    decoded = load_codec(model_dir).decode(load_codec(model_dir).encode(mnist[0][:63]))
    for key, image in zip(keys, decoded):
        if key != "../escape":
            assert (np.array(Image.open(f"{out}/{key}.png")) == image[..., 0]).all()

    # A file that cannot be created (its folder is a file): a dead letter for each of its images.
    blocked = str(tmp_path / "blocked")
    os.makedirs(blocked)
    open(f"{blocked}/b8", "w").close()
    summary, letters = decode_part(blocked)
    assert summary["written"] == 55 and summary["reasons"] == {"unsafe_key": 1, "unwritable_key": 7}


def test_webdataset_output_refuses_keys_webdataset_would_cut(tmp_path, model_dir, mnist):
    """WebDataset ends a key at the first dot of a member's base name: such a key, or one that
    would escape the folder, is a dead letter; the rest is a tar of `<key>.png` and `<key>.cls`."""
    import tarfile

    from conftest import write_tfrecord

    keys = ["a/one", "a/two.v2", "../up", "b/three", "c/" + "é" * 120]  # long, non-ASCII: a PAX header
    write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:5], labels=[1, 2, 3, 4, 5], keys=keys)
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    encode.run(["--input", str(tmp_path / "s.tfrecord"), "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    manifest = decode.run(["--input", lat, "--model-dir", model_dir, "--output", out, "--output-format", "webdataset",
                           "--max-bad-fraction", "0.6"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["dead_lettered_by_reason"] == {"unsafe_key": 2}
    (tar,) = manifest["files"]
    with tarfile.open(os.path.join(out, tar)) as t:
        members = {m.name: t.extractfile(m).read() for m in t}
    assert sorted(members) == ["a/one.cls", "a/one.png", "b/three.cls", "b/three.png", "c/" + "é" * 120 + ".cls",
                               "c/" + "é" * 120 + ".png"]
    assert members["a/one.cls"] == b"1" and members["b/three.cls"] == b"4"


def test_keys_that_cannot_be_files_are_dead_letters_not_a_failed_job(tmp_path, model_dir, mnist):
    from conftest import write_tfrecord

    long_key = "x" * 300
    keys = ["fine", "a", "a.png/b", long_key, "also/fine"]
    write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:5], keys=keys)
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    encode.run(["--input", str(tmp_path / "s.tfrecord"), "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    manifest = decode.run(["--input", lat, "--model-dir", model_dir, "--output", out, "--max-bad-fraction", "0.5"]
                          + BEAM_TEST_ARGS)
    c = manifest["counts"]
    assert (c["read"], c["written"], c["dead_lettered"]) == (5, 3, 2)
    assert c["dead_lettered_by_reason"] == {"unsafe_key": 1, "unwritable_key": 1}
    assert os.path.exists(os.path.join(out, "fine.png")) and os.path.exists(os.path.join(out, "also", "fine.png"))


def test_keys_one_file_apart_on_a_case_folding_filesystem_are_dead_letters_not_overwritten(
        tmp_path, model_dir, mnist, monkeypatch):
    """On macOS or Windows `Photo.png` and `photo.png` are one file (and `café` written with one
    code point or two): the second image would silently replace the first. The decode job probes
    its output folder and, where names fold, decodes the first key of each file name only."""
    import functools

    from conftest import write_tfrecord
    from pipeline import outputs

    keys = ["Photo", "cafe\u0301", "photo", "caf\u00e9", "other", "Photo"]
    write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:6], keys=keys)
    lat = str(tmp_path / "lat")
    encode.run(["--input", str(tmp_path / "s.tfrecord"), "--model-dir", model_dir, "--output", lat,
                "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)  # the second "Photo" is a duplicate already
    # This machine's folder tells all of them apart (and the probe leaves nothing behind) ...
    assert outputs.name_identity(str(tmp_path)) is None
    assert sorted(os.listdir(tmp_path)) == ["lat", "s.tfrecord"]
    out = str(tmp_path / "exact")
    manifest = decode.run(["--input", lat, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 5
    assert not any(name.startswith(".latentpack-name") for name in os.listdir(out))
    # ... a folding one would not: there the later key of each name is a dead letter naming the first.
    folding = functools.partial(outputs.folded_name, case=True, unicode=True)
    monkeypatch.setattr(decode, "name_identity", lambda folder: folding)
    out = str(tmp_path / "folding")
    manifest = decode.run(["--input", lat, "--model-dir", model_dir, "--output", out, "--max-bad-fraction", "0.5"]
                          + BEAM_TEST_ARGS)
    c = manifest["counts"]
    assert (c["read"], c["written"], c["dead_lettered_by_reason"]) == (5, 3, {"name_collision": 2})
    letters = [json.loads(line) for f in glob.glob(os.path.join(out, "dead_letter", "*.jsonl")) for line in open(f)]
    assert sorted((d["key"], d["reason"]) for d in letters) == [("caf\u00e9", "name_collision"),
                                                                 ("photo", "name_collision")]
    assert all("'Photo'" in d["error"] or "'cafe\u0301'" in d["error"] for d in letters)
    assert sorted(os.listdir(out)) == sorted(["Photo.png", "cafe\u0301.png", "other.png", "_manifest.json",
                                              "dead_letter"])


@pytest.mark.parametrize("fmt", ["png", "tfrecord", "parquet", "webdataset"])
def test_every_image_output_carries_the_colour_profile_of_a_row_that_has_one(tmp_path, fmt):
    from PIL import ImageCms

    from pipeline.images import ImageBatch, decode_photo
    from pipeline.outputs import WRITERS

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    images = np.random.default_rng(0).integers(0, 256, (2, 6, 5, 3), np.uint8)
    batch = ImageBatch(["with", "without"], images, np.array([1, -1]), np.array([True, False]),
                       icc_profiles=[icc, None])
    writer = WRITERS[fmt](str(tmp_path), "00000-of-00001")
    assert writer.write(batch) == (2, [])
    writer.close()
    reader = get_reader("images" if fmt == "png" else fmt)
    paths, root = reader.match(str(tmp_path / ("*.png" if fmt == "png" else f"*.{'tar' if fmt == 'webdataset' else fmt}")))
    photos = {r.key: decode_photo(r.encoded) for p in paths for r in reader.read(p, root)}
    assert {k: (p.icc, p.pixels.tobytes()) for k, p in photos.items()} == {
        "with": (icc, images[0].tobytes()), "without": (None, images[1].tobytes())}


def test_a_dataset_carries_a_model_that_is_not_shipped(shards, model_dir, tmp_path, capsys):
    """encode stores a model that is not shipped in the dataset (_model/, once, fingerprint-checked);
    a copy of the dataset elsewhere decodes, verifies and opens with no model argument."""
    import latentpack

    lat = str(tmp_path / "lat")
    assert cli.main(["encode", "--input", shards.pattern, "--model-dir", model_dir, "--output", lat]
                    + BEAM_TEST_ARGS) == 0
    assert "and the model," in capsys.readouterr().out
    manifest = json.load(open(os.path.join(lat, "_manifest.json")))
    model_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(model_dir) for f in fs)
    assert manifest["embedded_model"] == {"folder": "_model", "bytes": model_bytes}
    moved = str(tmp_path / "elsewhere" / "lat")
    shutil.copytree(lat, moved)
    out = str(tmp_path / "png")
    assert decode.run(["--input", moved, "--output", out] + BEAM_TEST_ARGS)["counts"]["written"] == 120
    assert cli.main(["verify", moved]) == 0
    assert len(latentpack.open(moved)) == 120
    # Re-encoding the folder keeps the one copy; a damaged copy is reported and refused.
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", moved, "--skip-existing"]
               + BEAM_TEST_ARGS)
    assert sorted(os.listdir(moved)).count("_model") == 1
    with open(os.path.join(moved, "_model", "saved_model.pb"), "ab") as f:
        f.write(b"\0")
    capsys.readouterr()
    assert cli.main(["verify", moved]) == 2
    assert "embedded model:" in capsys.readouterr().out
    with pytest.raises(LatentpackError, match="fingerprint|modified"):
        decode.run(["--input", moved, "--output", str(tmp_path / "png2")] + BEAM_TEST_ARGS)


def test_a_shipped_model_is_embedded_only_when_asked(shards, tmp_path, mnist):
    from conftest import write_tfrecord

    write_tfrecord(tmp_path / "p.tfrecord", [np.repeat(mnist[0][0], 3, axis=-1)], keys=["p"])
    plain, kept = str(tmp_path / "plain"), str(tmp_path / "kept")
    encode.run(["--input", str(tmp_path / "p.tfrecord"), "--model-dir", "photo:1", "--output", plain]
               + BEAM_TEST_ARGS)
    assert not os.path.exists(os.path.join(plain, "_model"))
    manifest = encode.run(["--input", str(tmp_path / "p.tfrecord"), "--model-dir", "photo:1", "--output", kept,
                           "--embed-model", "always"] + BEAM_TEST_ARGS)
    assert manifest["embedded_model"]["bytes"] > 1e6 and os.path.isfile(os.path.join(kept, "_model", "codec.json"))
