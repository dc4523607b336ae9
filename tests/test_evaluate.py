import json
import glob
import os
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS
from latentpack import cli
from pipeline import evaluate


def test_evaluate_models_and_classical_codecs(tmp_path, mnist, model_dir, rd_model_dir, capsys):
    np.savez(tmp_path / "val.npz", images=mnist[0][4900:4940], keys=np.array([f"v/{i:02d}" for i in range(40)]))
    out = str(tmp_path / "rd")
    assert cli.main(["evaluate", "--input", str(tmp_path / "val.npz"), "--input-format", "npz",
                     "--model-dir", rd_model_dir, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS) == 0
    report = json.load(open(os.path.join(out, "rd.json")))
    points = {p["name"]: p for p in report["points"]}
    assert report["images"] == 40 and report["sizes"] == ["28x28"]
    rd, ae = points["latentpack dense λ=0.02"], points["conv autoencoder"]
    assert rd["latent_format"] == "code" and ae["latent_format"] == "int"
    # Stored bytes are the encode job's Parquet bytes; the rate is the codes alone.
    parts = [f for f in os.listdir(os.path.join(out, "model-0", "latents")) if f.endswith(".parquet")]
    total = sum(os.path.getsize(os.path.join(out, "model-0", "latents", f)) for f in parts)
    assert rd["stored_bytes"] == total and abs(rd["stored_bpp"] - total * 8 / (40 * 784)) < 1e-9
    assert rd["bytes_per_image"] < total / 40
    assert points["png"]["psnr"] == 100.0 and points["png"]["ssim"] > 0.999
    for family in ("jpeg", "webp", "avif"):
        sweep = sorted((p for p in report["points"] if p["family"] == family), key=lambda p: p["quality"])
        assert len(sweep) >= 7
        assert sweep[0]["bpp"] < sweep[-1]["bpp"] and sweep[0]["psnr"] < sweep[-1]["psnr"]
        assert all(len(p["per_image"]["psnr"]) == 40 for p in sweep)
    assert "| webp q0 |" in open(os.path.join(out, "rd.md")).read()
    assert Image.open(os.path.join(out, "rd.png")).size[0] > 300


def test_evaluate_photos_of_mixed_sizes(tmp_path, photo_folder, spatial_model_dir):
    out = str(tmp_path / "rd")
    report = evaluate.run(["--input", str(photo_folder / "*.png"), "--input-format", "images",
                           "--model-dir", spatial_model_dir, "--output", out, "--classical", "jpeg", "webp",
                           "--limit", "9"] + BEAM_TEST_ARGS)
    assert report["images"] == 9 and len(report["sizes"]) == 3
    (model,) = [p for p in report["points"] if p["family"] == "latentpack-spatial"]
    assert model["images"] == 9 and 0 < model["bpp"] < model["stored_bpp"] and model["psnr"] > 5
    assert report["bd_rate"] == {"latentpack-spatial": {"webp": None, "jpeg": None}}  # one point: no curve
    # Again into the same folder, on fewer images: the earlier run's job folders and subset are
    # replaced (no image of the first subset is counted again).
    again = evaluate.run(["--input", str(photo_folder / "*.png"), "--input-format", "images",
                          "--model-dir", spatial_model_dir, "--output", out, "--classical", "jpeg",
                          "--limit", "4"] + BEAM_TEST_ARGS)
    assert again["images"] == 4 and [p["images"] for p in again["points"]] == [4] * len(again["points"])


@pytest.mark.parametrize("name", ["model-0", "subset", "rd.json", "rd.md", "rd.png"])
def test_evaluate_never_replaces_what_it_did_not_write(tmp_path, photo_folder, spatial_model_dir, name):
    """`--output .` in a project whose trained model is in `model-0/`, or whose notes are rd.md (or
    a figure rd.png) with no report of an earlier evaluation beside them: refused, and kept."""
    out = tmp_path / "project"
    mine = out / name
    if name.startswith("rd."):
        out.mkdir()
        mine.write_text('{"my": "notes"}')
    else:
        mine.mkdir(parents=True)
        (mine / "codec.json").write_text("{}")
    with pytest.raises(evaluate.LatentpackError, match=f"holds {name}, which (is not an earlier evaluation|no earlier)"):
        evaluate.run(["--input", str(photo_folder / "*.png"), "--input-format", "images", "--limit", "2",
                      "--model-dir", spatial_model_dir, "--output", str(out), "--classical", "jpeg"]
                     + BEAM_TEST_ARGS)
    assert sorted(os.listdir(out)) == [name]
    assert (mine.read_text() if name.startswith("rd.") else (mine / "codec.json").read_text()) in ('{"my": "notes"}', "{}")


def test_evaluate_never_reads_its_own_output(tmp_path, photo_folder, spatial_model_dir):
    """An --input glob that covers --output (the report kept in the photos' folder, run again with
    a glob that reaches it): refused before anything is written, or the evaluation would read its
    own rd.png as a test image."""
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(photo_folder, folder)
    common = ["--input-format", "images", "--limit", "2", "--model-dir", spatial_model_dir,
              "--output", str(folder / "report"), "--classical", "jpeg"] + BEAM_TEST_ARGS
    evaluate.run(["--input", str(folder / "*.png")] + common)
    before = {p: os.path.getmtime(p) for p in glob.glob(str(folder / "report" / "*"))}
    assert str(folder / "report" / "rd.png") in before
    with pytest.raises(evaluate.LatentpackError, match="matches files an evaluation writes into --output"):
        evaluate.run(["--input", str(folder / "**" / "*.png")] + common)
    assert {p: os.path.getmtime(p) for p in glob.glob(str(folder / "report" / "*"))} == before


def test_bd_rate_of_a_curve_against_itself_and_a_cheaper_one():
    anchor = [{"bpp": b, "psnr": q} for b, q in ((0.25, 28.0), (0.5, 31.0), (1.0, 34.0))]
    half = [{"bpp": p["bpp"] / 2, "psnr": p["psnr"]} for p in anchor]
    assert abs(evaluate.bd_rate(anchor, anchor)) < 1e-9
    assert abs(evaluate.bd_rate(anchor, half) - (-50.0)) < 1e-6
    assert evaluate.bd_rate(anchor, [{"bpp": 1, "psnr": 50}, {"bpp": 2, "psnr": 60}]) is None


def test_photo_rd_script_on_two_held_out_photos_of_each_kind(tmp_path, spatial_model_dir):
    """`make photo-rd` end to end on a small scale, recorded into a scratch BENCHMARKS.md (needs
    ../shared/data/bsds500 and wikiphotos)."""
    import subprocess
    import sys

    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind in ("bsds500", "wikiphotos"):
        if not os.path.isdir(os.path.join(root, "..", "shared", "data", kind)):
            pytest.skip(f"../shared/data/{kind} is not here")
    out = str(tmp_path / "rd")
    subprocess.run([sys.executable, os.path.join(root, "scripts", "photo_rd.py"), "--out", out, "--models",
                    spatial_model_dir, "--limit", "2"], cwd=root, check=True, capture_output=True, timeout=900)
    sys.path.insert(0, os.path.join(root, "scripts"))
    import photo_data
    import photo_rd
    import record
    for kind in ("bsds500", "wikiphotos"):
        report = json.load(open(os.path.join(out, kind, "rd.json")))
        assert report["images"] == 2
        assert {p["family"] for p in report["points"]} >= {"latentpack-spatial", "webp", "avif", "jxl"}
        webp = photo_rd.at_bpp(report["points"], "webp", sorted(p["bpp"] for p in report["points"]
                                                                 if p["family"] == "webp")[2])
        assert webp is not None and 15 < webp < 60
    # The wikiphotos evaluated are the ones the training mix holds out.
    assert all(photo_data.held_out("wikiphotos", n[:-4]) for n in os.listdir(os.path.join(out, "wikiphotos", "holdout")))
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n")
    original = record.BENCHMARKS
    record.BENCHMARKS = str(target)
    try:
        photo_rd.record(photo_rd.argparse.Namespace(dataset="photos", out=out), ["--limit", "2"],
                        ["bsds500", "wikiphotos"])
    finally:
        record.BENCHMARKS = original
    text = target.read_text()
    assert "### bsds500: 2 held-out photos" in text and "### wikiphotos: 2 held-out photos" in text
    assert "JPEG XL" in text and "worst photo" in text and (tmp_path / "rd-photos-wikiphotos.png").exists()


def test_photo_rd_script_on_held_out_cifar10_images(tmp_path, spatial_model_dir):
    """`photo_rd.py --dataset cifar10` on four held-out CIFAR-10 images, recorded into a scratch
    BENCHMARKS.md (needs ../shared/data/cifar10)."""
    import subprocess
    import sys

    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "..", "shared", "data", "cifar10")):
        pytest.skip("../shared/data/cifar10 is not here")
    out = str(tmp_path / "rd")
    subprocess.run([sys.executable, os.path.join(root, "scripts", "photo_rd.py"), "--dataset", "cifar10", "--out", out,
                    "--models", spatial_model_dir, "--limit", "4"], cwd=root, check=True, capture_output=True,
                   timeout=600)
    report = json.load(open(os.path.join(out, "rd.json")))
    assert report["images"] == 4 and report["sizes"] == ["32x32"]
    from training.data import is_holdout
    names = sorted(os.listdir(os.path.join(out, "holdout")))
    assert len(names) == 4 and all(is_holdout(n[:-4].replace("_", ":"), 10) for n in names)
    sys.path.insert(0, os.path.join(root, "scripts"))
    import photo_rd
    import record
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n")
    original = record.BENCHMARKS
    record.BENCHMARKS = str(target)
    try:
        photo_rd.record(photo_rd.argparse.Namespace(dataset="cifar10", out=out), ["--dataset", "cifar10"], ["cifar10"])
    finally:
        record.BENCHMARKS = original
    text = target.read_text()
    assert "<!-- cifar-rd:begin -->" in text and "| webp q0 |" in text


def test_photo_rd_gives_the_shipped_models_bd_rates_when_others_share_the_curve():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import photo_rd

    webp = [{"family": "webp", "bpp": b, "psnr": q} for b, q in ((0.2, 26.0), (0.5, 30.0), (1.0, 33.0))]
    ours = [{"family": "latentpack-hyperprior", "model_dir": m, "bpp": b, "psnr": q}
            for m, b, q in (("extra", 0.1, 26.0), ("photo:2", 0.2, 27.0), ("photo:4", 0.4, 29.0))]
    line = photo_rd.shipped_bd_rates(webp + ours)
    assert "(photo:2, photo:4)" in line and "webp: -" in line and "jpeg" not in line
    assert photo_rd.shipped_bd_rates(webp + ours[1:]) == ""  # the shipped models alone: nothing to add


def test_photo_rd_bytes_at_follows_each_curve_and_the_best_family():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import photo_rd

    def point(family, psnr, stored):
        return {"family": family, "psnr": psnr, "stored_bytes": stored * 10, "images": 10, "bytes_per_image": stored}

    points = [point("latentpack-spatial", 25.0, 60.0), point("latentpack-spatial", 27.0, 100.0),
              point("latentpack-hyperprior", 25.5, 60.0), point("latentpack-hyperprior", 26.5, 80.0),
              point("webp", 26.0, 150.0)]
    assert photo_rd.bytes_at(points, "latentpack-spatial", 26.0) == pytest.approx(np.sqrt(60.0 * 100.0))
    assert photo_rd.bytes_at(points, "latentpack-hyperprior", 25.0) is None  # below its curve
    # The best family at each PSNR: the hyperprior's curve where it reaches, else the spatial one.
    assert photo_rd.bytes_at(points, None, 26.0) == pytest.approx(np.sqrt(60.0 * 80.0))
    assert photo_rd.bytes_at(points, None, 26.75) == photo_rd.bytes_at(points, "latentpack-spatial", 26.75)
    assert photo_rd.bytes_at(points, None, 25.2) == photo_rd.bytes_at(points, "latentpack-spatial", 25.2)
    assert photo_rd.bytes_at(points, None, 24.0) is None
