import json
import os

import numpy as np
from PIL import Image

from conftest import BEAM_TEST_ARGS
from pipeline import cli


def test_evaluate_models_and_classical_codecs(tmp_path, mnist, model_dir, rd_model_dir, capsys):
    np.savez(tmp_path / "val.npz", images=mnist[0][4900:4940], keys=np.array([f"v/{i}" for i in range(40)]))
    out = str(tmp_path / "rd")
    assert cli.main(["evaluate", "--input", str(tmp_path / "val.npz"), "--input-format", "npz",
                     "--model-dir", rd_model_dir, "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS) == 0
    report = json.load(open(os.path.join(out, "rd.json")))
    points = {p["name"]: p for p in report["points"]}
    assert report["images"] == 40
    rd, ae = points["latentpack λ=0.02"], points["conv autoencoder"]
    assert rd["latent_format"] == "code" and ae["latent_format"] == "int"
    # Bytes are the encode job's Parquet bytes per image.
    parts = [f for f in os.listdir(os.path.join(out, "model-0", "latents")) if f.endswith(".parquet")]
    total = sum(os.path.getsize(os.path.join(out, "model-0", "latents", f)) for f in parts)
    assert abs(rd["bytes_per_image"] - total / 40) < 1e-9
    assert points["png"]["psnr"] == 100.0 and points["png"]["ssim"] > 0.999
    jpeg = [points[f"jpeg q{q}"] for q in (5, 50, 90)]
    assert jpeg[0]["bytes_per_image"] < jpeg[1]["bytes_per_image"] < jpeg[2]["bytes_per_image"]
    assert jpeg[0]["psnr"] < jpeg[1]["psnr"] < jpeg[2]["psnr"]
    assert all(0 < p["ssim"] <= 1 and p["container_bytes_per_image"] > 0
               for p in report["points"] if p["family"] in ("jpeg", "webp", "png"))
    assert "| webp q0 |" in open(os.path.join(out, "rd.md")).read()
    assert Image.open(os.path.join(out, "rd.png")).size[0] > 300
