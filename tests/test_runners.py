"""The same job under several worker processes, and the package Beam stages to remote workers."""
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq

from conftest import BEAM_TEST_ARGS
from pipeline import completion, encode, latents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(out):
    return pq.ParquetDataset(latents.part_paths(out, completion.read_manifest(out))).read().sort_by("key")


def test_two_worker_processes_give_the_same_rows(shards, model_dir, tmp_path):
    base = ["--input", shards.pattern, "--model-dir", model_dir]
    encode.run(base + ["--output", str(tmp_path / "one")] + BEAM_TEST_ARGS)
    encode.run(base + ["--output", str(tmp_path / "two"), "--runner=FnApiRunner", "--direct_num_workers=2",
                       "--direct_running_mode=multi_processing"])
    assert rows(str(tmp_path / "one")).equals(rows(str(tmp_path / "two")))


def test_sdist_for_setup_file_holds_both_packages_and_the_command(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    (sdist,) = [f for f in os.listdir(tmp_path) if f.endswith(".tar.gz")]
    with tarfile.open(tmp_path / sdist) as tar:
        names = tar.getnames()
        setup_py = tar.extractfile(next(n for n in names if n.endswith("/setup.py"))).read().decode()
    for module in ("latentpack/cli.py", "pipeline/encode.py", "pipeline/decode.py", "pipeline/formats.py",
                   "families/channelwise/codec.py", "families/spatial/transforms.py", "training/train.py", "training/loop.py", "models/__init__.py"):
        assert any(n.endswith(module) for n in names), module
    assert "latentpack=latentpack.cli:console" in setup_py


def test_encode_with_setup_file_on_the_direct_runner(shards, model_dir, tmp_path):
    out = str(tmp_path / "lat")
    manifest = encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", out,
                           "--setup_file", os.path.join(ROOT, "setup.py")] + BEAM_TEST_ARGS)
    assert manifest["counts"]["written"] == 120
