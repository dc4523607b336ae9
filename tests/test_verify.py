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
