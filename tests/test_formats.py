import gzip
import os
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


def test_files_that_differ_only_in_their_extension_keep_both_as_keys_with_it(tmp_path, mnist, model_dir):
    """`a.png` and `a.jpg` in one folder (a photo exported twice) would both be key `a`, and the
    second a `duplicate_key` dead letter: both are kept, as keys `a.png` and `a.jpg`; a file of
    the same stem in another folder, and every other file, keeps its usual key."""
    from conftest import BEAM_TEST_ARGS
    from pipeline import encode
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(encode_png(mnist[0][0]))
    Image.fromarray(mnist[0][1][..., 0]).save(folder / "a.jpg", quality=95)
    (folder / "b.png").write_bytes(encode_png(mnist[0][2]))
    (folder / "sub" / "a.png").write_bytes(encode_png(mnist[0][3]))
    recs = read_all("images", str(folder / "**" / "*.*"))
    assert sorted(r.key for r in recs) == ["a.jpg", "a.png", "b", "sub/a"]
    manifest = encode.run(["--input", str(folder / "**" / "*.*"), "--input-format", "images", "--model-dir",
                           model_dir, "--output", str(tmp_path / "lat")] + BEAM_TEST_ARGS)
    assert manifest["images"] == 4 and manifest["counts"]["dead_lettered"] == 0


def test_images_folder_keys_are_relative_paths_without_extension(tmp_path, mnist):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "a.png").write_bytes(encode_png(mnist[0][0]))
    (tmp_path / "imgs" / "sub" / "b.png").write_bytes(encode_png(mnist[0][1]))
    recs = read_all("images", str(tmp_path / "imgs" / "**.png"))
    assert sorted(r.key for r in recs) == ["a", "sub/b"]
    # `dir/**/*.png` (the README's form) takes the files directly in dir/ too, as shells do.
    recs = read_all("images", str(tmp_path / "imgs" / "**" / "*.png"))
    assert sorted(r.key for r in recs) == ["a", "sub/b"]
    (tmp_path / "imgs" / "sub" / "deeper").mkdir()
    (tmp_path / "imgs" / "sub" / "deeper" / "c.png").write_bytes(encode_png(mnist[0][2]))
    recs = read_all("images", str(tmp_path / "imgs" / "**" / "sub" / "**" / "*.png"))
    assert sorted(r.key for r in recs) == ["sub/b", "sub/deeper/c"]


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


def records(fmt, pattern):
    reader = get_reader(fmt)
    shards, root = reader.match(pattern)
    return [rec for shard in shards for rec in reader.records(shard, root)]


def test_fallback_keys_stay_distinct_across_folders(tmp_path, mnist):
    for year in ("2020", "2021"):
        (tmp_path / year).mkdir()
        np.savez(tmp_path / year / "images.npz", images=mnist[0][:2])
        write_tfrecord(tmp_path / year / "part.tfrecord", mnist[0][:2])
    npz = records("npz", str(tmp_path / "*" / "images.npz"))
    assert [r.key for r in npz] == ["2020/images:0", "2020/images:1", "2021/images:0", "2021/images:1"]
    tfr = records("tfrecord", str(tmp_path / "*" / "part.tfrecord"))
    assert len({r.key for r in tfr}) == 4 and tfr[0].key == "2020/part.tfrecord:0"


def test_npz_keys_and_labels_are_checked_not_dropped_or_mangled(tmp_path, mnist):
    images = mnist[0][:4]
    np.savez(tmp_path / "short.npz", images=images, keys=np.array(["a", "b"]))
    np.savez(tmp_path / "bytes.npz", images=images[:2], keys=np.array([b"k1", b"k2"]))
    np.savez(tmp_path / "float.npz", images=images[:3], labels=np.array([1.0, 2.5, 3.0]))
    np.savez(tmp_path / "wide.npz", images=images[:1], labels=np.array([2 ** 64 - 1], np.uint64))
    short = records("npz", str(tmp_path / "short.npz"))
    assert [(r.key, r.error.reason if r.error else None) for r in short] == [
        ("a", None), ("b", None), ("short:2", "bad_key"), ("short:3", "bad_key")]
    assert [r.key for r in records("npz", str(tmp_path / "bytes.npz"))] == ["k1", "k2"]
    floats = records("npz", str(tmp_path / "float.npz"))
    assert [(r.label, r.error.reason if r.error else None) for r in floats] == [(1, None), (None, "bad_label"),
                                                                               (3, None)]
    (wide,) = records("npz", str(tmp_path / "wide.npz"))
    assert wide.error.reason == "bad_label"


def test_webdataset_keys_follow_webdataset_rules_and_links_are_counted(tmp_path, mnist):
    import io
    import tarfile

    png = encode_png(mnist[0][0])
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("./000.png", png)
        add("./000.cls", b"7")
        add("set.v2/001.png", png)
        add("set.v2/001.cls", b"123456789012345678901")  # does not fit int64
        add("set.v2/002.seg.png", png)
        link = tarfile.TarInfo("set.v2/003.png")
        link.type, link.linkname = tarfile.SYMTYPE, "001.png"
        tar.addfile(link)
        add("004.png", png)
        add("004.png", png[:-1] + b"\1")  # the same member name again: another image of key 004
    recs = records("webdataset", str(shard))
    assert [(r.key, r.label, r.error.reason if r.error else None) for r in recs] == [
        ("000", 7, None), ("set.v2/001", None, "bad_label"), ("set.v2/002", None, None),
        ("set.v2/003", None, "unsupported_member"), ("004", None, None), ("004", None, None)]
    assert recs[-2].encoded == png and recs[-1].encoded != png  # neither is dropped: the job's key check sees both


def test_parquet_float_labels_and_idx_label_mismatch(tmp_path, mnist):
    import gzip as gz

    import pyarrow as pa
    import pyarrow.parquet as pq

    png = encode_png(mnist[0][0])
    pq.write_table(pa.table({"image": [png, png], "label": [1.0, 1.5]}), tmp_path / "t.parquet")
    recs = records("parquet", str(tmp_path / "t.parquet"))
    assert [(r.label, r.error.reason if r.error else None) for r in recs] == [(1, None), (None, "bad_label")]
    images = mnist[0][:3, ..., 0]
    with gz.open(tmp_path / "x-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 3, 28, 28) + images.tobytes())
    with gz.open(tmp_path / "x-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBBI", 0, 8, 1, 2) + bytes([1, 2]))
    (bad,) = records("idx", str(tmp_path / "x-images-idx3-ubyte.gz"))
    assert bad.error.reason == "bad_file" and "2 labels for the 3 images" in str(bad.error)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("fmt,ext", [("images", "png"), ("tfrecord", "tfrecord"), ("parquet", "parquet")])
def test_a_fifo_or_device_among_the_inputs_is_a_dead_letter_not_a_hang(tmp_path, mnist, fmt, ext):
    """Reading a FIFO blocks until someone writes to it; /dev/zero never ends (memory): neither is
    read. `open_input` (which reads the first shards for their feature names) skips them too."""
    from pipeline.formats import open_input

    good = tmp_path / f"b.{ext}"
    if fmt == "images":
        good.write_bytes(encode_png(mnist[0][0]))
    elif fmt == "tfrecord":
        write_tfrecord(good, mnist[0][:2], keys=["k0", "k1"])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"key": ["k0"], "image": [encode_png(mnist[0][0])]}), good)
    os.mkfifo(tmp_path / f"a.{ext}")
    os.symlink("/dev/zero", tmp_path / f"c.{ext}")
    reader, shards, root = open_input(fmt, str(tmp_path / f"*.{ext}"))
    assert [os.path.basename(s) for s in shards] == [f"a.{ext}", f"b.{ext}", f"c.{ext}"]
    recs = [r for shard in shards for r in reader.records(shard, root)]
    bad = [(os.path.basename(r.source), r.error.reason, str(r.error)) for r in recs if r.error]
    assert bad == [(f"a.{ext}", "unreadable_file", "not a regular file (a FIFO, device, socket or folder)"),
                   (f"c.{ext}", "unreadable_file", "not a regular file (a FIFO, device, socket or folder)")]
    assert len(recs) == 2 + (2 if fmt == "tfrecord" else 1)


def test_links_to_nothing_are_dead_letters_and_a_bare_glob_reads_the_working_folder(tmp_path, mnist, monkeypatch):
    """Beam's listing drops symbolic links whose target is gone, and finds nothing for a bare
    '*.png' in the working folder: neither may lose an input without a word."""
    from pipeline.formats import open_input

    (tmp_path / "sub").mkdir()
    for name in ("ok.png", "sub/ok.png"):
        (tmp_path / name).write_bytes(encode_png(mnist[0][0]))
    for name in ("gone.png", "sub/gone.png"):
        os.symlink(str(tmp_path / "moved-away.png"), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    reader, shards, root = open_input("images", "*.png")
    assert shards == ["./gone.png", "./ok.png"]
    recs = [r for shard in shards for r in reader.records(shard, root)]
    assert [(r.key, r.error and r.error.reason) for r in recs] == [("gone", "unreadable_file"), ("ok", None)]
    assert "a symbolic link to nothing" in str(recs[0].error) and "moved-away.png" in str(recs[0].error)
    for pattern, found in [("**.png", ["./gone.png", "./ok.png", "./sub/gone.png", "./sub/ok.png"]),
                           ("sub/*.png", ["sub/gone.png", "sub/ok.png"]),
                           (str(tmp_path / "*" / "gone.png"), [str(tmp_path / "sub" / "gone.png")]),
                           ("gone.png", ["gone.png"])]:
        assert open_input("images", pattern)[1] == found, pattern


def test_an_image_folders_keys_are_its_file_names_without_reading_the_files(tmp_path, mnist, monkeypatch):
    """The encode job's pass for keys seen twice takes a folder's keys from the file names (the
    files are read once, to encode them), and leaves out what `records` could not read."""
    from pipeline import formats

    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.jpg", "junk.png"):
        (tmp_path / name).write_bytes(encode_png(mnist[0][0]) if name != "junk.png" else b"not an image")
    os.symlink(str(tmp_path / "nowhere.png"), tmp_path / "gone.png")
    os.mkfifo(tmp_path / "pipe.png")
    reader, shards, root = formats.open_input("images", str(tmp_path / "**.*"))
    expected = [list(Reader.keys(reader, shard, root)) for shard in shards for Reader in [formats.Reader]]
    monkeypatch.setattr(formats, "_read_bytes", lambda path: pytest.fail(f"{path} was read"))
    assert [list(reader.keys(shard, root)) for shard in shards] == expected
    assert sorted(k for shard in shards for k, _ in reader.keys(shard, root)) == ["a", "junk", "sub/b"]


def test_the_input_format_is_told_from_the_files(tmp_path, mnist):
    """--input-format left out: magic bytes (images, Parquet, npy, npz, tar, idx), the TFRecord
    framing's checksum (whatever the file is named), a mixed or unknown folder one clear error."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.detect import resolve_input

    def folder(name):
        (tmp_path / name).mkdir()
        return tmp_path / name

    png = folder("png")
    (png / "a.png").write_bytes(encode_png(mnist[0][0]))
    buf = io.BytesIO()
    Image.fromarray(mnist[0][1][..., 0]).save(buf, "JPEG")
    (png / "b.jpg").write_bytes(buf.getvalue())
    assert resolve_input(str(png / "*"), None) == ("images", str(png / "*"))
    records = folder("rec")
    write_tfrecord(records / "part-00000", mnist[0][:2])  # no extension
    assert resolve_input(str(records / "*"), None)[0] == "tfrecord"
    (records / "features.json").write_text("{}")
    assert resolve_input(str(records / "part-*"), None)[0] == "tfds"
    pq.write_table(pa.table({"x": [1]}), folder("pq") / "t.parquet")
    assert resolve_input(str(tmp_path / "pq" / "*"), None)[0] == "parquet"
    np.save(folder("npy") / "a.npy", mnist[0][:2])
    assert resolve_input(str(tmp_path / "npy" / "*"), None)[0] == "npy"
    np.savez(folder("npz") / "a.npz", images=mnist[0][:2])
    assert resolve_input(str(tmp_path / "npz" / "*"), None)[0] == "npz"
    with tarfile.open(folder("tar") / "s.tar", "w") as tar:
        info = tarfile.TarInfo("k.png")
        data = encode_png(mnist[0][0])
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert resolve_input(str(tmp_path / "tar" / "*.tar"), None)[0] == "webdataset"
    head = struct.pack(">BBBBIII", 0, 0, 8, 3, 1, 28, 28)
    (folder("idx") / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + mnist[0][0].tobytes()))
    assert resolve_input(str(tmp_path / "idx" / "*"), None)[0] == "idx"
    # Given, a format is taken as it is; mixed or unknown files are one error naming the flag.
    assert resolve_input(str(png / "*"), "tfrecord") == ("tfrecord", str(png / "*"))
    (png / "c.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(LatentpackError, match="mixes formats"):
        resolve_input(str(png / "*"), None)
    (folder("odd") / "x.bin").write_bytes(b"hello world, not an image")
    with pytest.raises(LatentpackError, match="cannot tell the format .* pass --input-format"):
        resolve_input(str(tmp_path / "odd" / "*"), None)
    with pytest.raises(LatentpackError, match="is a folder: give a glob"):
        resolve_input(str(png), None)
