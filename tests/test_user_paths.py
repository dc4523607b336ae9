"""User paths no other test took: training flags of the small-image families, the photo family's
kernel storage, `inspect` on photos with their sources, `verify` with the wrong model, the jobs run
as modules. Each runs the real command and checks what it promised."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from latentpack import cli
from pipeline import encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "photos", "sources")


def spec_of(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "codec.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch,extra", [
    ("mlp", ["--latent-bits", "4", "--latent-dim", "12", "--seed", "3"]),
    ("conv", ["--latent-bits", "5", "--width", "8", "--latent-dim", "16", "--seed", "3"]),
])
def test_small_image_families_train_with_the_flags_users_pass(arch, extra, tmp_path, capsys):
    """`train --arch mlp|conv` on the embedded digits with --latent-bits, --width, --latent-dim and
    --seed: the artifact records them and encodes with them (latents within the bits' range)."""
    out = str(tmp_path / arch)
    assert cli.main(["train", "--arch", arch, "--input-format", "mnist-sample", "--epochs", "1", "--limit", "600",
                     "--model-dir", out] + extra) == 0
    spec = spec_of(out)
    training = spec["training"]
    bits = int(extra[extra.index("--latent-bits") + 1])
    assert training["latent_bits"] == bits and spec["latent_dim"] == int(extra[extra.index("--latent-dim") + 1])
    assert training["arch"] == arch and training["seed"] == 3 and spec["family"] == "dense"
    if arch == "conv":
        assert training["width"] == 8
    lat = str(tmp_path / "lat")
    manifest = encode.run(["--input-format", "mnist-sample", "--model-dir", out, "--output", lat,
                           "--latent-format", "int"] + BEAM_TEST_ARGS)
    import pyarrow.parquet as pq

    from pipeline import latents

    values = np.concatenate([np.asarray(v) for v in pq.ParquetDataset(latents.part_paths(lat, manifest)).read()
                             .column("latent").to_pylist()])
    assert values.min() >= -(1 << (bits - 1)) and values.max() < (1 << (bits - 1))


def test_a_photo_model_stores_its_kernels_as_asked(tmp_path, photo_folder):
    """`--kernel-storage float16` (the default is int8): the artifact says so and its SavedModel
    holds float16 kernels; it still encodes and decodes."""
    out = str(tmp_path / "f16")
    assert cli.main(["train", "--arch", "spatial", "--input", str(photo_folder / "*.png"), "--input-format", "images",
                     "--filters", "8", "--latent-channels", "8", "--crop", "32", "--batch-size", "2", "--steps", "2",
                     "--quality", "4", "--kernel-storage", "float16", "--model-dir", out]) == 0
    spec = spec_of(out)
    assert spec["training"]["kernel_storage"] == "float16"
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(out, "variables", "variables"))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    kernels = [name for name, shape in shapes.items() if len(shape) == 4]
    assert kernels and all(dtypes[name] == tf.float16 for name in kernels)
    from pipeline.codec import load_codec
    from pipeline.images import ImageBatch

    codec = load_codec(out)
    image = np.asarray(Image.open(sorted(photo_folder.iterdir())[0]))[None]
    columns = codec.compress(ImageBatch(["a"], image, np.full(1, -1, np.int64), np.zeros(1, bool)), "code")
    assert len(columns["code"][0].as_py()) > 0


def test_inspect_compares_photos_with_their_sources_in_a_picture(tmp_path):
    """`inspect --source --source-format images --picture` on a photo dataset: the picture is the
    originals above their reconstructions, and the summary says the quality against the sources."""
    lat = str(tmp_path / "lat")
    encode.run(["--input", os.path.join(GOLDEN, "*.png"), "--input-format", "images", "--model-dir", "photo:1",
                "--output", lat] + BEAM_TEST_ARGS)
    assert cli.main(["inspect", lat, "--picture", str(tmp_path / "missing" / "grid.png")]) == 2  # one line, no traceback
    picture = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "latentpack.cli", "inspect", lat, "--samples", "3", "--source",
                           os.path.join(GOLDEN, "*.png"), "--source-format", "images", "--picture", str(picture)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "psnr" in proc.stdout.lower() and "Traceback" not in proc.stderr
    grid = Image.open(picture)
    assert grid.width > 0 and grid.height > 0


def test_verify_with_another_model_says_so(tmp_path, shards, model_dir):
    """`verify DATASET --model-dir OTHER`: exit 2, naming the fingerprint mismatch."""
    lat = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    proc = subprocess.run([sys.executable, "-m", "latentpack.cli", "verify", lat, "--model-dir", "photo:1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "did not make this dataset" in proc.stdout and "1 problem(s) found" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "latentpack.cli", "verify", lat, "--model-dir", model_dir],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_the_jobs_run_as_modules(tmp_path, shards, model_dir):
    """`python -m pipeline.encode` and `python -m pipeline.decode`, as the README says."""
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    for argv in (["pipeline.encode", "--input", shards.pattern, "--model-dir", model_dir, "--output", lat],
                 ["pipeline.decode", "--input", lat, "--model-dir", model_dir, "--output", out]):
        proc = subprocess.run([sys.executable, "-m"] + argv + BEAM_TEST_ARGS, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert len([n for _, _, files in os.walk(out) for n in files if n.endswith(".png")]) == 120


def test_the_jobs_run_with_the_default_runner(tmp_path):
    """No --runner, as the README's commands and users run them: Beam's default (the DirectRunner,
    which looks for its Prism binary and, offline, falls back) encodes and decodes."""
    exe = os.path.join(os.path.dirname(sys.executable), "latentpack")
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    for argv in (["encode", "--input", os.path.join(GOLDEN, "rgb.png"), "--model-dir", "photo:1", "--output", lat],
                 ["decode", "--input", lat, "--output", out]):
        proc = subprocess.run([exe] + argv, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert Image.open(os.path.join(out, "rgb.png")).size == (112, 80)


def test_the_demo_runs_end_to_end(tmp_path):
    """`make demo`'s script as the Makefile runs it (only the folder and the in-process runner
    differ): it trains, encodes and decodes the held-out digits and the photos, and its report
    holds what the README quotes, within wide bounds (the README's run: 16.0x, 22.12 dB)."""
    out = tmp_path / "demo-out"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--out", str(out),
                           "--beam-args=--runner=FnApiRunner"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latentpack demo: 1000 held-out MNIST images" in proc.stdout and "Traceback" not in proc.stderr
    report = json.load(open(out / "report.json"))
    assert report["images"] == 1000 and report["dead_letters"] == 0
    assert report["compression_ratio"] > 10 and report["psnr_mean"] > 20
    assert report["refined"]["psnr_mean"] > report["psnr_mean"]
    for picture in ("comparison.png", "model/loss.png"):
        assert Image.open(out / picture).width > 0
    photos = json.load(open(out / "photos" / "report.json"))
    assert photos and os.listdir(out / "photos" / "compare")
