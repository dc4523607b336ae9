import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from latentpack import cli
from pipeline import completion, encode, inspection, latents


@pytest.fixture
def dataset(shards, model_dir, tmp_path):
    out = str(tmp_path / "latents")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", out, "--num-shards", "2"]
               + BEAM_TEST_ARGS)
    return out


def test_inspect_prints_summary_quality_and_picture(dataset, model_dir, shards, tmp_path, capsys):
    picture = str(tmp_path / "grid.png")
    assert cli.main(["inspect", dataset, "--model-dir", model_dir, "--samples", "6", "--picture", picture,
                     "--source", shards.pattern]) == 0
    out = capsys.readouterr().out
    assert "(complete)" in out and "120 in 2 part(s)" in out and "bytes per image" in out
    assert "latent   fixed_size_list<element: int8>[16]" in out
    # Where the bytes go: every column and the footers, which with Parquet's 12 framing bytes per
    # file make up the whole of each part.
    assert "bytes/image  key " in out and ", footer " in out
    manifest = completion.read_manifest(dataset)
    paths = latents.part_paths(dataset, manifest)
    split = inspection.byte_split(paths)
    assert sorted(split) == ["footer", "key", "label", "latent.list.element"]
    assert sum(split.values()) + 12 * len(paths) == manifest["total_bytes"]
    assert "PSNR mean" in out and "on 6 sampled images" in out
    assert Image.open(picture).size == (6 * 30 * 3, 2 * 30 * 3)  # 2 rows (original, reconstruction) of 6


def test_inspect_refuses_incomplete_unless_told(dataset, tmp_path, capsys):
    import os
    os.remove(os.path.join(dataset, latents.MANIFEST))
    assert cli.main(["inspect", dataset]) == 2
    assert "not a complete latent dataset" in capsys.readouterr().err
    assert cli.main(["inspect", dataset, "--allow-incomplete"]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out


def test_pandas_pyarrow_and_duckdb_read_the_same_rows(dataset, shards):
    files = latents.part_paths(dataset, completion.read_manifest(dataset))
    frame = pd.read_parquet(files).sort_values("key").reset_index(drop=True)
    table = ds.dataset(files, format="parquet").to_table().sort_by("key")
    rows = duckdb.sql(f"SELECT key, latent, label FROM read_parquet({files!r}) ORDER BY key").fetchall()
    assert frame["key"].tolist() == table.column("key").to_pylist() == [r[0] for r in rows] == shards.keys
    assert [list(x) for x in frame["latent"]] == table.column("latent").to_pylist() == [list(r[1]) for r in rows]
    assert frame["label"].tolist() == [r[2] for r in rows] == shards.labels.tolist()
    counts = dict(duckdb.sql(f"SELECT label, count(*) FROM read_parquet({files!r}) GROUP BY label").fetchall())
    assert sum(counts.values()) == 120


def test_a_picture_that_cannot_be_written_is_refused_before_decoding(dataset, model_dir, tmp_path, capsys):
    for where, message in ((tmp_path / "missing" / "grid.png", "does not exist"), (tmp_path, "is a folder")):
        assert cli.main(["inspect", dataset, "--model-dir", model_dir, "--samples", "4", "--picture",
                         str(where)]) == 2
        err = capsys.readouterr().err
        assert f"latentpack: error: --picture {where}" in err and message in err
    assert not (tmp_path / "missing").exists()
