"""Encoder-side refinement (`encode --refine`, pipeline/refine.py): better codes, same decoder."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import BEAM_TEST_ARGS
from pipeline import completion, decode, encode, latents
from pipeline.artifact import read_spec
from pipeline.codec import load_codec

V1_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v1", "model")


def encoded_and_decoded(shards, model_dir, out, *extra):
    """({key: code bytes}, {key: decoded image}, manifest) of the encode and decode jobs."""
    manifest = encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", str(out / "lat"),
                           *extra] + BEAM_TEST_ARGS)
    table = pq.ParquetDataset(latents.part_paths(str(out / "lat"), manifest)).read()
    codes = dict(zip(table.column("key").to_pylist(), table.column("code").to_pylist()))
    done = decode.run(["--input", str(out / "lat"), "--model-dir", model_dir, "--output", str(out / "npz"),
                       "--output-format", "npz"] + BEAM_TEST_ARGS)
    images = {}
    for name in done["files"]:
        with np.load(os.path.join(out / "npz", name)) as npz:
            images.update(zip(npz["keys"].tolist(), npz["images"]))
    return codes, images, manifest


def objective(shards, codes, images, lmbda):
    """Each image's distortion + lambda * rate as training measured it (MSE on [0, 1], bits per pixel)."""
    out = []
    for key, original in zip(shards.keys, shards.images):
        mse = np.mean((original.astype(np.float64) - images[key].astype(np.float64)) ** 2) / 255.0 ** 2
        out.append(mse + lmbda * 8 * len(codes[key]) / original.size)
    return np.array(out)


def test_refined_codes_decode_with_the_same_decoder_and_trade_better(shards, rd_model_dir, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "refined").mkdir()
    plain_codes, plain_images, _ = encoded_and_decoded(shards, rd_model_dir, tmp_path / "plain")
    codes, images, manifest = encoded_and_decoded(shards, rd_model_dir, tmp_path / "refined", "--refine", "30")
    assert manifest["refine"] == 30 and manifest["counts"]["written"] == len(shards.keys)
    assert sorted(images) == sorted(shards.keys) and codes.keys() == plain_codes.keys()
    assert codes != plain_codes  # the search moved latents
    lmbda = read_spec(rd_model_dir).training["lmbda"]
    before, after = objective(shards, plain_codes, plain_images, lmbda), objective(shards, codes, images, lmbda)
    assert after.mean() < 0.97 * before.mean(), (after.mean(), before.mean())
    # Per image the search keeps its best rounded latents by the tables' code lengths; the stored
    # bytes can differ from those by the coder's last few bits, never by much.
    assert (after <= before + lmbda * 8 * 2 / shards.images[0].size).all()
    from latentpack import cli
    assert cli.main(["inspect", str(tmp_path / "refined" / "lat")]) == 0
    assert "encoded with --refine 30" in capsys.readouterr().out


def test_zero_steps_are_the_encoders_own_latents_and_the_rate_is_the_tables(rd_model_dir, mnist):
    codec = load_codec(rd_model_dir)
    images = mnist[0][:64]
    plain = codec.encode(images).astype(np.int64)
    assert np.array_equal(codec.refiner(images, 0), plain)
    # At integers the interpolated rate is the tables' code length exactly; the range coder's bytes
    # hold it to within its few bits of flushing.
    estimate = codec.refiner.rate(plain.astype(np.float32)).numpy()
    actual = np.array([8 * len(c) for c in codec.entropy.encode(plain)])
    assert np.all(np.abs(actual - estimate) <= 16), (actual - estimate)
    refined = codec.refiner(images, 10)
    assert refined.shape == plain.shape
    assert (refined >= codec.low).all() and (refined <= codec.high).all()


def test_an_artifact_exported_before_refinement_gains_it_with_its_codes_unchanged(tmp_path, mnist):
    from families.dense.export import add_refinement_to

    model = str(tmp_path / "model")
    shutil.copytree(V1_MODEL, model)
    os.chmod(model, 0o755)
    images = mnist[0][:32]
    before = load_codec(model)
    assert before.missing_refinement() and "add_refinement_to" in before.missing_refinement()
    spec = add_refinement_to(model)
    assert spec["family"] == "dense" and read_spec(model).fingerprint == spec["fingerprint"]
    after = load_codec(model)
    assert after.missing_refinement() is None
    assert np.array_equal(after.encode(images), before.encode(images))
    latent = before.encode(images)
    assert np.array_equal(after.decode(latent), before.decode(latent))
    assert sorted(os.listdir(tmp_path)) == ["model"]  # nothing left beside it


def test_re_export_interrupted_between_its_renames_is_finished_by_the_next_call(tmp_path):
    from families.dense.export import add_refinement_to

    shutil.copytree(V1_MODEL, tmp_path / "model.before-refinement")  # the state a crash would leave
    (tmp_path / "model.refinable").mkdir()
    add_refinement_to(str(tmp_path / "model"))
    assert load_codec(str(tmp_path / "model")).missing_refinement() is None
    assert sorted(os.listdir(tmp_path)) == ["model"]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "latentpack.cli", "encode", *argv, *BEAM_TEST_ARGS],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["negative", "too many", "no entropy model", "exported before"])
def test_refine_that_cannot_apply_is_one_clear_error(case, shards, model_dir, tmp_path):
    model, steps = {"negative": (model_dir, "-1"), "too many": (model_dir, "1000000"),
                    "no entropy model": (model_dir, "5"), "exported before": (V1_MODEL, "5")}[case]
    proc = run_cli("--input", shards.pattern, "--model-dir", model, "--output", str(tmp_path / "out"),
                   "--refine", steps)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentpack: error: --refine"), proc.stderr
    assert not os.path.exists(tmp_path / "out" / completion.MANIFEST)


def test_a_photo_model_without_its_lambda_cannot_refine(photo_model_dir):
    import dataclasses

    from pipeline.codec import codec_class

    spec = read_spec(photo_model_dir)
    assert codec_class(spec).check_refine(spec) is None
    untrained = dataclasses.replace(spec, training={k: v for k, v in spec.training.items() if k != "lmbda"})
    assert codec_class(spec).check_refine(untrained).startswith("--refine needs a model trained with --quality")


def test_both_latent_formats_hold_the_same_refined_latents(shards, rd_model_dir, tmp_path):
    tables = {}
    for latent_format in ("code", "int"):
        out = str(tmp_path / latent_format)
        manifest = encode.run(["--input", shards.pattern, "--model-dir", rd_model_dir, "--output", out,
                               "--latent-format", latent_format, "--refine", "20"] + BEAM_TEST_ARGS)
        tables[latent_format] = pq.ParquetDataset(latents.part_paths(out, manifest)).read().sort_by("key")
    codec = load_codec(rd_model_dir)
    keys = tables["code"].column("key").to_pylist()
    from_codes = codec._latents(tables["code"], keys)[0]
    from_ints = codec._latents(tables["int"], keys)[0]
    assert np.array_equal(from_codes, from_ints)
    assert not np.array_equal(from_codes, codec.encode(np.stack([shards.images[shards.keys.index(k)] for k in keys])))


def test_evaluate_draws_a_refined_curve_beside_the_plain_one(tmp_path, mnist, model_dir, rd_model_dir, capsys):
    import json

    from latentpack import cli

    np.savez(tmp_path / "val.npz", images=mnist[0][4900:4940], keys=np.array([f"v/{i:02d}" for i in range(40)]))
    args = ["evaluate", "--input", str(tmp_path / "val.npz"), "--input-format", "npz", "--classical"]
    out = str(tmp_path / "rd")
    assert cli.main(args + ["--model-dir", rd_model_dir, "--model-dir", model_dir, "--refine", "0", "20",
                            "--output", out] + BEAM_TEST_ARGS) == 0
    points = {p["name"]: p for p in json.load(open(os.path.join(out, "rd.json")))["points"]}
    assert sorted(points) == ["conv autoencoder", "latentpack dense λ=0.02", "latentpack dense λ=0.02 refined 20"]
    plain, refined = points["latentpack dense λ=0.02"], points["latentpack dense λ=0.02 refined 20"]
    assert (refined["family"], refined["refine"], plain["refine"]) == ("latentpack-dense-refined", 20, 0)
    assert refined["psnr"] > plain["psnr"]
    assert "evaluated without refinement" in capsys.readouterr().out
    # A model of the right kind without the signatures: one clear error before anything is evaluated.
    assert cli.main(args + ["--model-dir", V1_MODEL, "--refine", "0", "5", "--output", str(tmp_path / "v1")]
                    + BEAM_TEST_ARGS) == 2
    assert "add_refinement_to" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "v1" / "model-0")


# --- photo models (spatial and hyperprior families) ---------------------------------------------

def photo_losses(folder, lat, out, model_dir):
    """{key: (stored loss, code)} of an encoded photo dataset, decoded by the decode
    job: lambda * MSE (0..255) + code bits per pixel, the models' training loss."""
    from PIL import Image

    table = pq.ParquetDataset(latents.part_paths(lat, completion.read_manifest(lat))).read()
    decode.run(["--input", lat, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS)
    lmbda = read_spec(model_dir).training["lmbda"]
    result = {}
    for key, code in zip(table.column("key").to_pylist(), table.column("code").to_pylist()):
        original = np.asarray(Image.open(os.path.join(folder, key + ".png")), np.float64)
        decoded = np.asarray(Image.open(os.path.join(out, key + ".png")), np.float64)
        assert decoded.shape == original.shape
        pixels = original.shape[0] * original.shape[1]
        result[key] = (lmbda * np.mean((original - decoded) ** 2) + 8 * len(code) / pixels, code)
    return result


def test_refined_photo_codes_decode_with_the_same_decoder_and_trade_better(photo_model_dir, photo_folder,
                                                                           tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("refined", ["--refine", "15"])):
        lat = str(tmp_path / name)
        manifest = encode.run(["--input", str(photo_folder / "*.png"), "--input-format", "images",
                               "--model-dir", photo_model_dir, "--output", lat, *extra] + BEAM_TEST_ARGS)
        assert manifest["counts"]["written"] == 24 and manifest["refine"] == (15 if extra else 0)
        runs[name] = photo_losses(photo_folder, lat, str(tmp_path / f"{name}-png"), photo_model_dir)
    plain, refined = runs["plain"], runs["refined"]
    assert plain.keys() == refined.keys()
    # Per image, the stored loss (the code's bytes; the pixels by the search's float synthesis, a rounding
    # away from the decoder's) of the encoder's latents and of the refined ones decides: never worse, and
    # better on the whole.
    assert all(refined[k][0] <= plain[k][0] * 1.001 for k in plain)
    assert np.mean([refined[k][0] for k in plain]) < 0.99 * np.mean([plain[k][0] for k in plain])
    assert sum(refined[k][1] != plain[k][1] for k in plain) >= 8


def test_photo_refinement_at_zero_steps_is_the_encoder_and_its_rate_is_the_tables(spatial_model_dir):
    from conftest import smooth_photos
    from families.spatial.codec import pad_to_multiple

    codec = load_codec(spatial_model_dir)
    image = np.stack(smooth_photos(np.random.default_rng(5), 1, sizes=[(37, 53)]))
    padded = pad_to_multiple(image, codec.stride)
    plain = codec.analysis(image)[0]
    low, high = codec.coder.offsets, codec.coder.offsets + codec.coder.sizes - 1
    table = codec.latent_tables(plain[None])[0]
    assert np.array_equal(codec.refiner(padded[0], (37, 53), table, 0), np.clip(plain, low, high))
    # At integers the interpolated rate is the tables' code length: the range coder's bytes hold it
    # to within its few bits of flushing.
    refiner = codec.refiner
    import tensorflow as tf
    latent = np.clip(plain, low, high).astype(np.float32)
    estimate = float(tf.reduce_sum(refiner._rate(latent, refiner.table_low[table], refiner.table_size[table],
                                                 (table * refiner.width).astype(np.int32))))
    assert abs(8 * len(codec.coder.encode(latent.astype(np.int64))) - estimate) <= 16
    found = codec.refiner(padded[0], (37, 53), table, 10)
    assert found.shape == plain.shape and (found >= low).all() and (found <= high).all()


def test_a_large_photo_is_refined_tile_by_tile(hyperprior_model_dir, monkeypatch):
    """Above REGION_PIXELS the search runs on tiles of latents with fixed context around them (memory
    stays bounded); every tile is searched, and the image still gains."""
    from conftest import smooth_photos
    from pipeline import refine
    from pipeline.images import ImageBatch

    codec = load_codec(hyperprior_model_dir)
    image = np.stack(smooth_photos(np.random.default_rng(7), 1, sizes=[(100, 150)]))
    batch = ImageBatch(["big"], image, np.array([-1]), np.array([False]))
    whole = codec.refiner(np.pad(image[0], ((0, 12), (0, 10), (0, 0)), mode="edge"), (100, 150),
                          codec.latent_tables(codec.analysis(image))[0], 15)
    searched = []
    original = refine.TransformRefiner._search

    def spy(self, x, weight, y, free, *rest):
        searched.append((x.shape, int(free.sum()), float(weight.sum())))
        return original(self, x, weight, y, free, *rest)

    monkeypatch.setattr(refine, "REGION_PIXELS", 48 * 48)
    monkeypatch.setattr(refine, "TILE_LATENTS", 3)
    monkeypatch.setattr(refine, "TILE_MARGIN", 1)
    monkeypatch.setattr(refine.TransformRefiner, "_search", spy)
    tiled = codec.refiner(np.pad(image[0], ((0, 12), (0, 10), (0, 0)), mode="edge"), (100, 150),
                          codec.latent_tables(codec.analysis(image))[0], 15)
    # A 7 x 10 latent grid in tiles of 3: 3 x 4 tiles, each its own latents free, its own pixels weighed.
    assert len(searched) == 12 and sum(free for _, free, _ in searched) == 7 * 10
    assert sum(w for _, _, w in searched) == 100 * 150
    assert max(shape[1] * shape[2] for shape, _, _ in searched) <= (5 * 16) ** 2
    assert tiled.shape == whole.shape and not np.array_equal(tiled, codec.analysis(image)[0])
    monkeypatch.setattr(refine.TransformRefiner, "_search", original)
    plain = codec.compress(batch, "code")["code"][0].as_py()
    refined = codec.compress(batch, "code", 15)["code"][0].as_py()
    assert refined != plain


def test_small_photos_are_searched_together_as_each_would_be_alone(photo_model_dir):
    """Photos far below the region size go through one search per group (the call overhead of one
    search per 32x32 image was ~0.2 s); each keeps its own best latents, as when searched alone."""
    from conftest import smooth_photos

    codec = load_codec(photo_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(9), 3, sizes=[(48, 64)]))
    latent = codec.analysis(images)
    tables = codec.latent_tables(latent)
    together = codec.refiner.refine_all(images, (48, 64), tables, 10)
    alone = np.stack([codec.refiner(image, (48, 64), table, 10) for image, table in zip(images, tables)])
    assert together.shape == latent.shape
    assert np.mean(together == alone) > 0.99  # float summation order may differ in a batch
    distortions = codec.refiner.distortions(images, (48, 64), tables, together)
    assert np.allclose(distortions, [codec.refiner.distortion(image, (48, 64), table, z)
                                     for image, table, z in zip(images, tables, together)], rtol=1e-4)
