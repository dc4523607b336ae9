import glob
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import BEAM_TEST_ARGS, write_tfrecord
from pipeline import completion, encode, latents, sinks
from pipeline.codec import load_codec
from pipeline.artifact import read_spec
from pipeline.errors import LatentpackError
from pipeline.formats import get_reader
from pipeline.images import DeadLetter, ImageBatch
from pipeline.tfrecord import make_example


def read_rows(output):
    manifest = completion.read_manifest(output)
    table = pq.ParquetDataset(latents.part_paths(output, manifest)).read().sort_by("key")
    return manifest, table


def test_unit_batches_directly(tmp_path, mnist):
    path = write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:5], keys=list("abcde"),
                          extra_records=[make_example(b"junk", "bad")])
    other = write_tfrecord(tmp_path / "t.tfrecord", mnist[0][5:8], keys=list("fgh"))
    out = list(encode.unit_batches(get_reader("tfrecord"), [(path, {3: (path, 0)}), (other, {})], str(tmp_path),
                                   (28, 28, 1), 3, 10 ** 6))
    batches = [o for o in out if isinstance(o, ImageBatch)]
    letters = [o for o in out if isinstance(o, DeadLetter)]
    assert [b.keys for b in batches] == [["a", "b", "c"], ["e", "f", "g"], ["h"]]  # a unit's shards share batches
    assert [(d.key, d.reason, d.index) for d in letters] == [("d", "duplicate_key", 3), ("bad", "undecodable", 5)]


def test_work_units_stay_within_parts_and_bounds():
    part_of = {f"f{i:02d}.png": f"part-{i // 5}" for i in range(12)}
    unit_of = encode.work_units(part_of, files=3)
    assert [unit_of[f"f{i:02d}.png"] for i in range(12)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert len(set(encode.work_units(part_of).values())) == 12  # a container file is a unit alone
    sizes = {f"f{i:02d}.png": 40 for i in range(12)}
    bounded = encode.work_units(part_of, files=100, max_bytes=100, sizes=sizes)
    assert [bounded[f"f{i:02d}.png"] for i in range(12)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]


def test_encode_unit_dofn_directly(model_dir, mnist, tmp_path):
    path = write_tfrecord(tmp_path / "s.tfrecord", mnist[0][:3], labels=np.array([1, 2, 3]), keys=["a", "b", "c"])
    fn = encode.EncodeUnit(get_reader("tfrecord"), str(tmp_path), model_dir, read_spec(model_dir), "int", 2, 10 ** 6)
    fn.setup()
    out = list(fn.process((0, [(path, "latents-00000-of-00001.parquet", [])])))
    assert {part for part, _ in out} == {"latents-00000-of-00001.parquet"}
    tables = [item for _, item in out if isinstance(item, pa.Table)]
    assert [t.column("key").to_pylist() for t in tables] == [["a", "b"], ["c"]]
    assert out[-1][1] == sinks.ShardDone(path)  # the part is written only once every shard is in
    table = pa.concat_tables(tables)
    assert table.column("label").to_pylist() == [1, 2, 3]
    assert np.array_equal(latents.latents_of(table), load_codec(model_dir).encode(mnist[0][:3]))


def test_encode_images_in_a_test_pipeline(shards, model_dir):
    pattern, keys = shards.pattern, shards.keys
    spec = read_spec(model_dir)
    part_of = {s: f"part-{i}" for i, s in enumerate(sorted(glob.glob(pattern)))}
    with BeamTestPipeline(argv=BEAM_TEST_ARGS) as p:
        items = p | encode.EncodeImages(part_of, get_reader("tfrecord"), os.path.dirname(pattern), model_dir, spec, "int", 16)
        got = items | beam.FlatMap(lambda kv: kv[1].column("key").to_pylist() if isinstance(kv[1], pa.Table) else [])
        assert_that(got, equal_to(keys))
        done = items | beam.Filter(lambda kv: isinstance(kv[1], sinks.ShardDone)) | beam.Map(lambda kv: kv[0])
        assert_that(done, equal_to(["part-0", "part-1", "part-2"]), label="EveryShardDone")


def test_encode_job_writes_a_complete_dataset(shards, model_dir, tmp_path):
    pattern, images, keys = shards.pattern, shards.images, shards.keys
    bad = write_tfrecord(tmp_path / "shards" / "zz-bad.tfrecord", images[:1], keys=["ok-one"],
                         extra_records=[make_example(b"junk", "junk-key")])
    with open(bad, "ab") as f:
        f.write(b"\x10\x00")  # a truncated tail
    out = str(tmp_path / "latents")
    manifest = encode.run(["--input", pattern, "--model-dir", model_dir, "--output", out,
                           "--batch-size", "16", "--max-bad-fraction", "0.05"] + BEAM_TEST_ARGS)
    assert manifest["complete"] and manifest["images"] == 121
    assert manifest["counts"] == {"read": 123, "written": 121, "dead_lettered": 2,
                                  "dead_lettered_by_reason": {"truncated": 1, "undecodable": 1}}
    assert manifest["model_fingerprint"] == read_spec(model_dir).fingerprint
    parts = latents.part_paths(out, manifest)
    assert manifest["total_bytes"] == sum(os.path.getsize(p) for p in parts)
    _, table = read_rows(out)
    assert table.column("key").to_pylist() == sorted(keys + ["ok-one"])
    meta = latents.metadata_of(pq.read_schema(parts[0]))
    assert meta["model_fingerprint"] == manifest["model_fingerprint"] and meta["latent_dim"] == 16
    latent_type = table.schema.field("latent").type
    assert latent_type.list_size == 16 and latent_type.value_type == pa.int8()
    digits = table.filter(pc.starts_with(table.column("key"), "digits/"))
    assert np.array_equal(latents.latents_of(digits), load_codec(model_dir).encode(images))
    assert digits.column("label").to_pylist() == shards.labels.tolist()
    letters = [json.loads(line) for f in glob.glob(f"{out}/dead_letter/*.jsonl") for line in open(f)]
    assert sorted((d["key"], d["reason"]) for d in letters) == [("junk-key", "undecodable"),
                                                                ("zz-bad.tfrecord:2", "truncated")]
    assert all(d["source"].endswith("zz-bad.tfrecord") and d["error"] for d in letters)


def test_rerun_gives_identical_rows_and_no_stale_parts(shards, model_dir, tmp_path):
    pattern = shards.pattern
    out = str(tmp_path / "latents")
    args = ["--input", pattern, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS
    encode.run(args + ["--num-shards", "3"])
    _, first = read_rows(out)
    encode.run(args + ["--num-shards", "1"])
    manifest, second = read_rows(out)
    assert first.equals(second)
    # (_model: the model, not a shipped one, travels with the dataset)
    assert sorted(os.listdir(out)) == ["_manifest.json", "_model", "dead_letter", "latents-00000-of-00001.parquet"]


def test_empty_glob_and_bad_model_are_clear_errors(tmp_path, model_dir):
    with pytest.raises(LatentpackError, match="no files match"):
        encode.run(["--input", str(tmp_path / "none*.tfrecord"), "--model-dir", model_dir,
                    "--output", str(tmp_path / "o")] + BEAM_TEST_ARGS)
    with pytest.raises(LatentpackError, match="not a latentpack model artifact"):
        encode.run(["--input", "x", "--model-dir", str(tmp_path), "--output", str(tmp_path / "o")])


def test_too_many_bad_inputs_fail_the_job_and_leave_it_unmarked(shards, model_dir, tmp_path):
    write_tfrecord(tmp_path / "shards" / "zz-bad.tfrecord", [], extra_records=[make_example(b"junk")] * 3)
    out = str(tmp_path / "latents")
    args = ["--input", shards.pattern, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS
    with pytest.raises(LatentpackError, match=r"3 of 123 inputs \(2.4%\).*--max-bad-fraction 0.01"):
        encode.run(args)
    assert not os.path.exists(os.path.join(out, latents.MANIFEST))
    with pytest.raises(LatentpackError, match="not a complete latent dataset"):
        completion.read_manifest(out)
    # The same data is accepted with a looser limit, and the failure marker is gone.
    assert encode.run(args + ["--max-bad-fraction", "0.03"])["counts"]["dead_lettered"] == 3
    assert not os.path.exists(os.path.join(out, "_failed.json"))


def test_junk_first_records_are_dead_letters_not_a_refused_job(tmp_path, model_dir, mnist):
    """Feature names are found from the first records that show them: a shard that starts with
    bytes that are no Example, or with an Example without an image, still encodes the rest."""
    from pipeline.tfrecord import frame

    label_only = make_example(b"", None, 3).replace(b"image/encoded", b"image/unknown")
    path = tmp_path / "s.tfrecord"
    with open(path, "wb") as f:
        f.write(frame(b"\x00not an example\xff"))
        f.write(frame(label_only))
    with open(path, "ab") as f:
        f.write(open(write_tfrecord(tmp_path / "t.tfrecord", mnist[0][:5], keys=list("abcde")), "rb").read())
    os.remove(tmp_path / "t.tfrecord")
    out = str(tmp_path / "lat")
    manifest = encode.run(["--input", str(path), "--model-dir", model_dir, "--output", out, "--max-bad-fraction", "0.5"]
                          + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 5
    assert manifest["counts"]["dead_lettered_by_reason"] == {"bad_record": 1, "missing_image": 1}


def test_a_part_that_did_not_report_stops_the_manifest():
    from pipeline.accounting import reported

    summaries = [{"part": "out/latents-00000-of-00002.parquet"}, {"part": "out/latents-00000-of-00002.parquet"}]
    with pytest.raises(RuntimeError, match=r"1 part\(s\) were not written, e.g. out/latents-00001-of-00002"):
        reported(summaries, ["out/latents-00000-of-00002.parquet", "out/latents-00001-of-00002.parquet"], "written")
    assert list(reported(summaries, ["out/latents-00000-of-00002.parquet"], "written")) == [
        "out/latents-00000-of-00002.parquet"]  # a retried task's second report counts once


def test_job_options_in_beams_snake_case_as_launchers_write_them(shards, model_dir, tmp_path):
    """Airflow's Beam operators and Dataflow templates pass options from a dict: `--model_dir=...`."""
    out = str(tmp_path / "lat")
    manifest = encode.run([f"--input={shards.pattern}", "--input_format=tfrecord", f"--model_dir={model_dir}",
                           f"--output={out}", "--batch_size", "7", "--skip_existing"] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 120 and manifest["incremental"]


def test_plan_parts_by_files_and_bytes():
    shards = [f"s{i:03d}" for i in range(10)]
    # Container shards: a part each; --num-shards: equal shard counts.
    assert sinks.plan_parts(shards, {}) == list(range(10))
    assert sinks.plan_parts(shards, {}, num_parts=3) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sinks.plan_parts(shards[:2], {}, num_parts=5) == [0, 1]
    # Folders: a part closes at >= min_files and >= min_bytes; a short remainder joins the last.
    sizes = {s: 100 for s in shards}
    assert sinks.plan_parts(shards, sizes, min_files=3, min_bytes=0) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert sinks.plan_parts(shards, sizes, min_files=3, min_bytes=450) == [0] * 5 + [1] * 5
    assert sinks.plan_parts(shards, sizes, min_files=3, min_bytes=10 ** 6) == [0] * 10
    big = dict(sizes, s000=10 ** 6)
    assert sinks.plan_parts(shards, big, min_files=3, min_bytes=450) == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert sinks.plan_parts([], sizes, min_files=3) == []


def test_a_folder_of_small_images_is_one_part_and_large_images_several(tmp_path, model_dir):
    from PIL import Image

    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir(), large.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(small / f"{i:03d}.png")
    reader = get_reader("images")
    shards, _ = reader.match(str(small / "*.png"))
    assert len(reader.sizes) == 300 and all(reader.sizes[s] > 0 for s in shards)
    spec = read_spec(model_dir)
    sink = sinks.WriteLatentDataset(str(tmp_path / "out"), spec, "code", {}, 0, 0.01, (), reader.part_files,
                                    reader.part_bytes, reader.sizes)
    sink.prepare(shards)
    assert set(sink.part_of.values()) == {"latents-00000-of-00001.parquet"}  # 300 files, far below 16 MiB
    # Photo-sized files: parts of 256 files once they pass 16 MiB.
    sizes = {f"p{i:04d}.jpg": 200_000 for i in range(600)}
    sink = sinks.WriteLatentDataset(str(tmp_path / "out2"), spec, "code", {}, 0, 0.01, (), reader.part_files,
                                    reader.part_bytes, sizes)
    sink.prepare(sorted(sizes))
    assert sorted(set(sink.part_of.values())) == ["latents-00000-of-00002.parquet", "latents-00001-of-00002.parquet"]
    assert list(sink.part_of.values()).count("latents-00001-of-00002.parquet") == 344


def test_a_part_records_its_run_of_input_shards_and_older_lists_still_read():
    import base64
    import zlib

    files = [f"/data/img/{i:05d}.png" for i in range(3000)]
    meta = {sinks.SOURCES_KEY: sinks.sources_metadata(reversed(files))}
    assert len(meta[sinks.SOURCES_KEY]) < 100  # whatever the number of files
    assert sinks.read_sources(meta) == {"first": files[0], "last": files[-1], "shards": 3000}
    older = {b"latentpack_sources_zlib": base64.b64encode(zlib.compress(json.dumps(files[:2]).encode()))}
    oldest = {b"latentpack_sources": json.dumps(files[:2]).encode()}
    for m in (older, oldest):
        assert sinks.read_sources(m) == {"first": files[0], "last": files[1], "shards": 2, "files": files[:2]}
    with pytest.raises(KeyError):
        sinks.read_sources({})


def test_a_damaged_shard_record_in_a_footer_leaves_the_part_known_by_name(tmp_path):
    path = str(tmp_path / "latents-x.parquet")
    for bad in (b'{"first": 1, "last": null, "shards": "x"}', b"not json", b'["a"]'):
        table = pa.table({"key": ["a"]}).replace_schema_metadata({
            latents.METADATA_KEY: json.dumps({"model_fingerprint": "sha256:0", "latent_format": "code"}).encode(),
            sinks.COUNTS_KEY: b'{"read": 1, "written": 1, "dead_lettered": 0, "dead_lettered_by_reason": {}}',
            sinks.SOURCES_KEY: bad})
        pq.write_table(table, path)
        state = sinks.part_state(path)
        assert (state.fingerprint, state.latent_format, state.sources) == ("sha256:0", "code", None)
    # Such a part (or one from before parts recorded their shards) holds the shard its name is made of.
    import types
    named = str(tmp_path / sinks.part_name(["/in/b.tfrecord"]))
    os.rename(path, named)
    sink = sinks.WriteNewShards(str(tmp_path), types.SimpleNamespace(fingerprint="sha256:0"), "code", {})
    assert sink.held_shards(["/in/a.tfrecord", "/in/b.tfrecord"], [named]) == ({"/in/b.tfrecord"}, {})


def test_the_summary_says_bits_per_pixel_and_how_much_smaller(shards, model_dir, tmp_path, capsys):
    from latentpack import cli

    out = str(tmp_path / "lat")
    assert cli.main(["encode", "--input", shards.pattern, "--model-dir", model_dir, "--output", out]
                    + BEAM_TEST_ARGS) == 0
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["pixels"] == 120 * 28 * 28
    assert manifest["input_bytes"] == sum(os.path.getsize(p) for p in glob.glob(shards.pattern))
    line = capsys.readouterr().out
    assert f"{8 * manifest['total_bytes'] / manifest['pixels']:.3f} bits per pixel" in line
    assert f"{manifest['input_bytes'] / manifest['total_bytes']:.1f}x smaller than the input files" in line


def test_hidden_files_are_left_out_but_counted(mnist, model_dir, tmp_path):
    from pipeline.images import encode_png

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_png(mnist[0][0]))
    (folder / ".a.png").write_bytes(encode_png(mnist[0][1]))  # a sync tool's copy
    manifest = encode.run(["--input", str(folder / "*.png"), "--model-dir", model_dir, "--output",
                           str(tmp_path / "lat")] + BEAM_TEST_ARGS)
    assert manifest["images"] == 1 and manifest["hidden_files_skipped"] == 1
