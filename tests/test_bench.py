"""The throughput benchmark script runs end to end on a tiny input (its numbers are not checked:
timing is for `make bench`, never for tests)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_script_runs_every_variant_and_the_step_profile(tmp_path):
    env = dict(os.environ, BENCH_NO_PRISM="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--out", str(tmp_path),
                    "--n", "400", "--scale", "1", "--repeats", "1", "--keep-outputs",
                    "--variants", "loop", "beam", "naive", "naive-4x", "dec-loop", "dec-beam", "dec-loop-tfr",
                    "dec-beam-tfr"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    report = json.load(open(tmp_path / "bench.json"))
    runs = report["results"]["400"]
    assert {v: runs[v]["images"] for v in runs} == {"loop": 400, "beam": 400, "naive": 100, "naive-4x": 400,
                                                    "dec-loop": 400, "dec-beam": 400, "dec-loop-tfr": 400,
                                                    "dec-beam-tfr": 400}
    assert all(runs[v]["wall_s"] > 0 and runs[v]["peak_rss_mb"] > 100 for v in runs)
    assert "naive" in report["ratios"]["steady"]
    md = (tmp_path / "bench.md").read_text()
    assert md.count("|") > 20 and "| growth |" not in md  # one size: no growth table, not an empty one
    # naive-4x encoded every image, not a sample.
    import pyarrow.dataset as ds
    table = ds.dataset(str(tmp_path / "scratch" / "400-r1-naive-4x"), format="parquet").to_table()
    assert table.num_rows == 400 and len(set(table.column("key").to_pylist())) == 400
    # The decode loops do the same work as the decode job: the same images, as files or as shards.
    scratch = tmp_path / "scratch"
    for loop, job in [("dec-loop", "dec-beam"), ("dec-loop-tfr", "dec-beam-tfr")]:
        a, b = (sorted(p.relative_to(scratch / f"400-r1-{v}") for p in (scratch / f"400-r1-{v}").rglob("*.png"))
                for v in (loop, job))
        assert a == b and len(a) == (400 if loop == "dec-loop" else 0)
    from pipeline.formats import get_reader
    reader = get_reader("tfrecord")
    for v in ("dec-loop-tfr", "dec-beam-tfr"):
        shards, root = reader.match(str(scratch / f"400-r1-{v}" / "*.tfrecord"))
        records = [r for s in shards for r in reader.records(s, root)]
        assert len(records) == 400 and all(r.error is None and r.label is not None for r in records)
    assert "beam/loop decode tfrecord" in report["ratios"]["400"]

    # The per-step profile the BENCHMARKS table comes from, on the same input and model.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--child", "encode-steps",
                          str(tmp_path / "input-400" / "*.tfrecord"), str(tmp_path / "model")],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    steps = dict(line.rsplit(None, 2)[:2] for line in out.splitlines() if line.endswith("us/image"))
    assert set(steps) == {"read TFRecord framing, parse Examples", "decode PNGs into batches",
                          "model encode (alone, for the split below)", "model encode + entropy coding (compress)",
                          "Arrow tables",
                          "(for comparison) decode PNGs with Pillow"}
    assert all(float(v) >= 0 for v in steps.values())

    # The file-creation measurement BENCHMARKS quotes, tiny: it prints both lines and leaves nothing.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--child", "file-creation",
                          str(tmp_path / "files"), "50", "120"],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    lines = [line for line in out.splitlines() if line.endswith("us/file")]
    assert len(lines) == 2 and all(float(line.split()[-2]) > 0 for line in lines)
    assert not (tmp_path / "files").exists()
