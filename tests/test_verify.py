"""Damaged datasets are noticed: sealed manifests, per-part checksums, `latentpack verify`."""
import json
import os

import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS
from latentpack import cli
from pipeline import completion, decode, encode, latents
from pipeline.errors import LatentpackError


@pytest.fixture
def dataset(tmp_path, shards, rd_model_dir):
    out = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", rd_model_dir, "--output", out, "--num-shards", "2"]
               + BEAM_TEST_ARGS)
    return out


def test_manifest_is_sealed_and_parts_carry_checksums(dataset, rd_model_dir, capsys):
    manifest = completion.read_manifest(dataset)
    assert completion.SEAL in manifest and all(len(p["crc32c"]) == 8 for p in manifest["files"])
    assert cli.main(["verify", dataset, "--model-dir", rd_model_dir]) == 0
    assert "ok:" in capsys.readouterr().out


def test_flipped_bits_in_a_part_are_caught(dataset, rd_model_dir, tmp_path, capsys):
    part = latents.part_paths(dataset, completion.read_manifest(dataset))[0]
    data = bytearray(open(part, "rb").read())
    data[120] ^= 0x10  # inside the first data page: same size, same footer, only the checksum can tell
    open(part, "wb").write(bytes(data))
    assert cli.main(["verify", dataset]) == 2
    out = capsys.readouterr()
    assert "CRC32C" in out.out and "1 problem(s)" in out.err
    with pytest.raises(LatentpackError, match="damaged_part"):
        decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", str(tmp_path / "o")]
                   + BEAM_TEST_ARGS)
    assert not os.path.exists(tmp_path / "o" / completion.MANIFEST)
    # --allow-damaged decodes the intact part and accounts for every row of the damaged one.
    manifest = decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", str(tmp_path / "o2"),
                           "--allow-damaged", "--max-bad-fraction", "1"] + BEAM_TEST_ARGS)
    c = manifest["counts"]
    damaged_rows = completion.read_manifest(dataset)["files"][0]["rows"]
    assert c["dead_lettered_by_reason"] == {"damaged_part": damaged_rows}
    assert c["read"] == 120 and c["written"] == 120 - damaged_rows


def test_a_part_replaced_by_a_shorter_one_is_refused(dataset, rd_model_dir, tmp_path):
    first, second = latents.part_paths(dataset, completion.read_manifest(dataset))
    table = pq.read_table(first)
    pq.write_table(table.slice(0, 5), first)
    with pytest.raises(LatentpackError, match="the dataset is damaged"):
        decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", str(tmp_path / "o")]
                   + BEAM_TEST_ARGS)
    with pytest.raises(LatentpackError, match="damaged"):
        cli_main_or_raise(["inspect", dataset])


def cli_main_or_raise(argv):
    from pipeline import inspection
    return inspection.main(argv[1:])


def test_an_edited_manifest_and_escaping_names_are_refused(dataset, rd_model_dir, tmp_path):
    path = os.path.join(dataset, completion.MANIFEST)
    manifest = json.load(open(path))
    manifest["images"] += 1
    json.dump(manifest, open(path, "w"))
    with pytest.raises(LatentpackError, match="modified"):
        completion.read_manifest(dataset)
    for name in ("../other/latents-0.parquet", "/etc/latents.parquet", "sub/latents.parquet"):
        manifest = completion.seal(dict(manifest, files=[{"name": name, "bytes": 1, "rows": 1}]))
        json.dump(manifest, open(path, "w"))
        with pytest.raises(LatentpackError, match="refusing to follow"):
            decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", str(tmp_path / "o")]
                       + BEAM_TEST_ARGS)


def test_a_key_stored_twice_is_decoded_once_and_dead_lettered_after(dataset, rd_model_dir, tmp_path):
    """Encode never stores a key twice; a dataset rewritten by hand (manifest re-sealed) can. Two
    rows of one key would be two images written to one PNG file: the later ones are dead letters."""
    import pyarrow as pa

    from pipeline.latents import file_crc32c

    manifest = completion.read_manifest(dataset)
    first, second = latents.part_paths(dataset, manifest)
    a, b = pq.read_table(first), pq.read_table(second)
    # The second part repeats the first part's key at row 3 in its row 5, and its own row 0 in row 7.
    keys = b.column("key").to_pylist()
    keys[5], keys[7] = a.column("key")[3].as_py(), keys[0]
    pq.write_table(b.set_column(b.schema.get_field_index("key"), "key", pa.array(keys, pa.string())), second)
    entry = next(f for f in manifest["files"] if f["name"] == os.path.basename(second))
    entry.update(bytes=os.path.getsize(second), crc32c=file_crc32c(second))
    manifest.pop(completion.SEAL)
    completion.write_json(os.path.join(dataset, completion.MANIFEST), completion.seal(manifest))

    out = str(tmp_path / "png")
    with pytest.raises(LatentpackError, match="duplicate_key"):  # 2 of 120 is over the default 1%
        decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", out] + BEAM_TEST_ARGS)
    result = decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", out,
                         "--max-bad-fraction", "0.05"] + BEAM_TEST_ARGS)
    assert result["counts"]["written"] == 118 and result["counts"]["dead_lettered_by_reason"] == {"duplicate_key": 2}
    letters = sorted((json.loads(line) for name in os.listdir(os.path.join(out, "dead_letter"))
                      for line in open(os.path.join(out, "dead_letter", name))), key=lambda d: d["index"])
    assert [(d["index"], d["reason"], d["source"]) for d in letters] == [(5, "duplicate_key", second),
                                                                         (7, "duplicate_key", second)]
    assert f"key also at {os.path.basename(first)}:3" in letters[0]["error"]
    assert f"key also at {os.path.basename(second)}:0" in letters[1]["error"]
    pngs = [f for _, _, files in os.walk(out) for f in files if f.endswith(".png")]
    assert len(pngs) == 118


def test_a_resealed_manifest_that_cannot_be_so_and_an_unlisted_part(dataset, rd_model_dir, tmp_path, capsys):
    """A manifest resealed by hand with a wrong image count or an unknown format version is refused
    by decode and reported by verify; a part file the manifest does not list is reported."""
    import shutil

    path = os.path.join(dataset, completion.MANIFEST)
    original = json.load(open(path))
    first = latents.part_paths(dataset, original)[0]
    shutil.copy(first, os.path.join(dataset, "latents-99999-of-99999.parquet"))
    assert cli.main(["verify", dataset]) == 2
    assert "latents-99999-of-99999.parquet is not listed in the manifest" in capsys.readouterr().out
    os.remove(os.path.join(dataset, "latents-99999-of-99999.parquet"))
    for change, message in (({"images": original["images"] + 7}, "says 127 images, its parts' entries 120 rows"),
                            ({"format_version": 99}, "format_version 99 is not one this latentpack reads")):
        json.dump(completion.seal(dict(original, **change)), open(path, "w"))
        assert cli.main(["verify", dataset]) == 2
        assert message in capsys.readouterr().out
        with pytest.raises(LatentpackError, match=message.replace("(", r"\(")):
            decode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", str(tmp_path / "o")]
                       + BEAM_TEST_ARGS)
        assert not os.path.exists(tmp_path / "o")
