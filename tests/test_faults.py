"""The dead letters of docs/reliability.md's fault table that no other test produced through the
jobs: each test makes the fault, runs the real job, and asserts the reason and the count (the
table names these tests; `test_every_reason_in_the_fault_table_has_a_named_test` keeps it so)."""
import ast
import glob
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from pipeline import completion, decode, encode, latents
from pipeline.latents import file_crc32c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "photos", "sources")


def dead_letters(folder: str) -> list:
    return sorted(((d["key"], d["reason"]) for name in glob.glob(os.path.join(folder, "dead_letter", "*.jsonl"))
                   for d in map(json.loads, open(name))), key=str)


def rewrite(dataset: str, column: str, change) -> None:
    """Rewrite one column of a dataset's single part (`change(values, keys) -> values`) and reseal
    the manifest, as someone editing a dataset by hand (or a buggy writer) would: the part's CRC and
    the manifest's seal are right, the row is not."""
    manifest = completion.read_manifest(dataset)
    (path,) = latents.part_paths(dataset, manifest)
    table = pq.read_table(path)
    values = change(table.column(column).to_pylist(), table.column("key").to_pylist())
    field = table.schema.field(column)
    pq.write_table(table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type)), path)
    entry = next(f for f in manifest["files"] if f["name"] == os.path.basename(path))
    entry.update(bytes=os.path.getsize(path), crc32c=file_crc32c(path))
    manifest.pop(completion.SEAL)
    completion.write_json(os.path.join(dataset, completion.MANIFEST), completion.seal(manifest))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_keys_that_are_not_utf8_are_bad_key_dead_letters(tmp_path, mnist, model_dir):
    """A key of bytes that are not UTF-8 text, in each format that carries keys (npz, Parquet,
    TFRecord's image/key): a `bad_key` dead letter for that image, never a key mangled with U+FFFD;
    the other images keep their keys exactly."""
    from tensorflow.core.example import example_pb2

    from pipeline.tfrecord import frame

    images = mnist[0][:4, ..., 0]
    bad = b"caf\xe9-latin1"
    folder = tmp_path / "in"
    folder.mkdir()
    np.savez(folder / "a.npz", images=images, keys=np.array([b"n0", bad, b"n2", b"n3"]))
    pq.write_table(pa.table({"image": [{"bytes": png(x), "path": None} for x in images],
                             "key": pa.array([b"p0", b"p1", bad, b"p3"], pa.binary())}), folder / "b.parquet")
    with open(folder / "c.tfrecord", "wb") as f:
        for i, x in enumerate(images):
            ex = example_pb2.Example()
            ex.features.feature["image/encoded"].bytes_list.value.append(png(x))
            ex.features.feature["image/key"].bytes_list.value.append(bad if i == 3 else f"t{i}".encode())
            f.write(frame(ex.SerializeToString()))
    kept = []
    for name, fmt in (("a.npz", "npz"), ("b.parquet", "parquet"), ("c.tfrecord", "tfrecord")):
        lat = str(tmp_path / f"lat-{fmt}")
        manifest = encode.run(["--input", str(folder / name), "--input-format", fmt, "--model-dir", model_dir,
                               "--output", lat, "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)
        assert manifest["counts"]["dead_lettered_by_reason"] == {"bad_key": 1}, fmt
        assert manifest["images"] == 3
        letters = dead_letters(lat)
        assert [reason for _, reason in letters] == ["bad_key"]
        table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read()
        kept += table.column("key").to_pylist()
    assert sorted(kept) == ["n0", "n2", "n3", "p0", "p1", "p3", "t0", "t1", "t2"]
    assert not any("\ufffd" in k for k in kept)


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory):
    """The golden photos rgb, grey and profiled encoded with the shipped photo:1."""
    work = tmp_path_factory.mktemp("faults")
    folder = work / "in"
    folder.mkdir()
    for name in ("rgb.png", "grey.png", "profiled.png"):
        with open(os.path.join(GOLDEN, name), "rb") as src, open(folder / name, "wb") as dst:
            dst.write(src.read())
    lat = str(work / "lat")
    encode.run(["--input", str(folder / "*.png"), "--input-format", "images", "--model-dir", "photo:1",
                "--output", lat] + BEAM_TEST_ARGS)
    return lat


def copy_dataset(src: str, dest: str) -> str:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_a_row_whose_profile_does_not_describe_its_pixels_is_bad_row_on_decode(photo_dataset, tmp_path):
    """The RGB profile of one row moved onto the grey row: decoding it would write a PNG whose
    profile contradicts its pixels, so that row is a `bad_row` dead letter; the others decode."""
    lat = copy_dataset(photo_dataset, str(tmp_path / "lat"))

    def move(profiles, keys):
        rgb_profile = profiles[keys.index("profiled")]
        return [rgb_profile if k == "grey" else p for k, p in zip(keys, profiles)]

    rewrite(lat, "icc_profile", move)
    out = str(tmp_path / "out")
    result = decode.run(["--input", lat, "--output", out, "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)
    assert result["counts"]["dead_lettered_by_reason"] == {"bad_row": 1}
    assert dead_letters(out) == [("grey", "bad_row")]
    assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == ["profiled.png", "rgb.png"]


def test_a_code_that_does_not_decode_is_bad_code(photo_dataset, tmp_path):
    """One row's code replaced by bytes the range decoder cannot read, another's with one bit
    flipped (which it reads as other, plausible latents, but which are not the bytes those latents
    encode to): `bad_code` dead letters, never images made up from them; the third row decodes."""
    lat = copy_dataset(photo_dataset, str(tmp_path / "lat"))
    garbage = np.random.default_rng(0).integers(0, 256, 152, dtype=np.uint8).tobytes()

    def damage(codes, keys):
        flipped = bytearray(codes[keys.index("profiled")])
        flipped[len(flipped) // 3] ^= 0x10
        return [garbage if k == "rgb" else bytes(flipped) if k == "profiled" else c for k, c in zip(keys, codes)]

    rewrite(lat, "code", damage)
    out = str(tmp_path / "out")
    result = decode.run(["--input", lat, "--output", out, "--max-bad-fraction", "1"] + BEAM_TEST_ARGS)
    assert result["counts"]["dead_lettered_by_reason"] == {"bad_code": 2}
    assert dead_letters(out) == [("profiled", "bad_code"), ("rgb", "bad_code")]
    assert not os.path.exists(os.path.join(out, "rgb.png")) and os.path.exists(os.path.join(out, "grey.png"))


def test_a_dense_code_that_does_not_decode_is_bad_code(shards, rd_model_dir, tmp_path):
    """The same for an entropy-coded digit model: a code with bytes after its end, and one whose
    tail was zeroed, decode to plausible digits; they are `bad_code` because a code must be the
    very bytes its decoded values encode to (`pipeline.entropy.CheckedReader`)."""
    lat = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", rd_model_dir, "--output", lat, "--num-shards", "1"]
               + BEAM_TEST_ARGS)
    damaged = {3: lambda c: c + c, 7: lambda c: c[:len(c) // 2] + bytes(len(c) - len(c) // 2)}
    rewrite(lat, "code", lambda codes, keys: [damaged[i](c) if i in damaged else c for i, c in enumerate(codes)])
    out = str(tmp_path / "out")
    result = decode.run(["--input", lat, "--model-dir", rd_model_dir, "--output", out, "--max-bad-fraction", "0.5"]
                        + BEAM_TEST_ARGS)
    assert result["counts"]["dead_lettered_by_reason"] == {"bad_code": 2}
    assert result["counts"]["written"] == 118


@pytest.mark.parametrize("family", ["photo", "dense"])
def test_latents_outside_the_models_range_are_bad_latent(family, photo_dataset, shards, model_dir, tmp_path):
    """Integer latents (`--latent-format int`) edited past the model's tables or quantizer range:
    a `bad_latent` dead letter, never clipped into range and decoded."""
    lat = str(tmp_path / "lat")
    if family == "photo":
        encode.run(["--input", os.path.join(GOLDEN, "rgb.png"), "--input-format", "images", "--model-dir", "photo:1",
                    "--output", lat, "--latent-format", "int"] + BEAM_TEST_ARGS)
        model, bad, far = "photo:1", 0, 30000  # int16 latents
    else:
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat, "--num-shards", "1",
                    "--latent-format", "int"] + BEAM_TEST_ARGS)
        model, bad, far = model_dir, 5, 127  # int8 latents of a 6-bit quantizer: -32..31

    def push(values, keys):
        values = [list(v) for v in values]
        values[bad][0] = far
        return values

    rewrite(lat, "latent", push)
    out = str(tmp_path / "out")
    result = decode.run(["--input", lat, "--model-dir", model, "--output", out, "--max-bad-fraction", "1"]
                        + BEAM_TEST_ARGS)
    assert result["counts"]["dead_lettered_by_reason"] == {"bad_latent": 1}
    assert [reason for _, reason in dead_letters(out)] == ["bad_latent"]


def test_images_a_dense_model_cannot_take_are_wrong_size_channels_or_dtype(tmp_path, mnist, model_dir):
    """The digit model takes 28x28 grey uint8 images: another size is `wrong_size` (never resized),
    a colour image `wrong_channels`, a float array `wrong_dtype`."""
    folder = tmp_path / "in"
    folder.mkdir()
    digits = mnist[0][:3, ..., 0]
    np.save(folder / "ok.npy", digits)
    np.save(folder / "size.npy", np.zeros((2, 30, 28), np.uint8))
    np.save(folder / "floats.npy", digits.astype(np.float32))
    Image.fromarray(np.zeros((28, 28, 3), np.uint8) + 100).save(folder / "colour.png")
    counts = {}
    for name, fmt in (("*.npy", "npy"), ("colour.png", "images")):
        manifest = encode.run(["--input", str(folder / name), "--input-format", fmt, "--model-dir", model_dir,
                               "--output", str(tmp_path / f"lat-{fmt}"), "--max-bad-fraction", "1"] + BEAM_TEST_ARGS)
        for reason, n in manifest["counts"]["dead_lettered_by_reason"].items():
            counts[reason] = counts.get(reason, 0) + n
    assert counts == {"wrong_size": 2, "wrong_dtype": 3, "wrong_channels": 1}


def _named_tests(cell: str) -> list:
    return re.findall(r"`(test_\w+\.py)::(test_\w+)`", cell)


def test_every_reason_in_the_fault_table_has_a_named_test():
    """docs/reliability.md: each row that names a dead-letter reason names a test (`file::test`)
    whose source asserts that reason; every reason the code can give is in the table."""
    table = [line for line in open(os.path.join(ROOT, "docs", "reliability.md"))
             if line.startswith("| ") and not line.startswith("| fault |")]
    code_reasons = set()
    for path in glob.glob(os.path.join(ROOT, "pipeline", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "families", "**", "*.py"), recursive=True):
        text = open(path).read()
        code_reasons |= set(re.findall(r'BadImage\(\s*"([a-z_]+)"', text))
        code_reasons |= set(re.findall(r'DeadLetter\([^()]*?,\s*"([a-z_]+)",\s*f?"', text))
    sources = {}
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        text = open(path).read()
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef):
                sources[(os.path.basename(path), node.name)] = ast.get_source_segment(text, node)
    in_table = set()
    for row in table:
        cells = row.split(" | ")
        what, tests = " | ".join(cells[1:-1]), cells[-1]
        reasons = {r for r in re.findall(r"`([a-z_]+)`", what) if r in code_reasons}
        if not reasons:
            continue
        in_table |= reasons
        named = _named_tests(tests)
        assert named, f"fault-table row names reasons {sorted(reasons)} but no test (file.py::test): {row[:80]}"
        for name in named:
            assert name in sources, f"the fault table names {name[0]}::{name[1]}, which does not exist"
        for reason in reasons:
            assert any(f'"{reason}"' in sources[n] for n in named), \
                f"no test the row names asserts `{reason}`: {row[:80]}"
    assert code_reasons - in_table == set(), f"reasons missing from the fault table: {code_reasons - in_table}"


def test_a_file_name_that_is_not_utf8_is_a_bad_key_dead_letter(tmp_path, mnist, model_dir):
    """An image folder holding a file whose name is Latin-1 bytes (copied from an old archive):
    Beam's string coder cannot carry the name, which once killed the job with a traceback. The file
    is a `bad_key` dead letter naming it with its bytes escaped; the rest encodes, the format is
    still told from the files."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(mnist[0][0, ..., 0]).save(folder / "ok.png")
    bad = os.path.join(os.fsencode(str(folder)), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(png(mnist[0][1, ..., 0]))
    lat = str(tmp_path / "lat")
    manifest = encode.run(["--input", str(folder / "*.png"), "--model-dir", model_dir, "--output", lat,
                           "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)
    assert manifest["images"] == 1 and manifest["counts"]["dead_lettered_by_reason"] == {"bad_key": 1}
    (letter,) = [json.loads(line) for name in glob.glob(os.path.join(lat, "dead_letter", "*.jsonl"))
                 for line in open(name)]
    assert letter["reason"] == "bad_key" and "caf\\xe9.png" in letter["error"] and letter["key"] == "caf\\xe9.png"
