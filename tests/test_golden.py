"""Exact pixels: real photographs in the forms users have them (EXIF-rotated, grey, 16-bit, palette,
CMYK, with a colour profile) through the real encode and decode jobs with the shipped photo:1,
compared pixel for pixel with the decoded images recorded in tests/golden/photos/decoded
(`tests/golden/photos/make.py` says how they were made and when to make them again)."""
import os

import numpy as np
import pytest
from PIL import Image

import latentpack
from conftest import BEAM_TEST_ARGS
from pipeline import decode, encode
from pipeline.images import psnr

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "photos")
KEYS = sorted(name[:-4] for name in os.listdir(os.path.join(GOLDEN, "decoded")))
MODES = {"rgb": "RGB", "rotated": "RGB", "upside_down": "RGB", "grey": "L", "sixteen": "I;16", "palette": "P",
         "cmyk": "CMYK", "profiled": "RGB"}


def pixels(path: str) -> np.ndarray:
    image = np.asarray(Image.open(path))
    return image[..., None] if image.ndim == 2 else image


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("golden")
    lat, out = str(work / "lat"), str(work / "out")
    manifest = encode.run(["--input", os.path.join(GOLDEN, "sources", "*"), "--input-format", "images",
                           "--model-dir", "photo:1", "--output", lat] + BEAM_TEST_ARGS)
    decode.run(["--input", lat, "--output", out] + BEAM_TEST_ARGS)  # the model found by its fingerprint
    return manifest, lat, out


def test_the_golden_set_is_what_make_py_describes():
    assert KEYS == sorted(MODES)
    assert sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(GOLDEN, "sources"))) == KEYS


@pytest.mark.parametrize("key", sorted(MODES))
def test_photos_decode_to_exactly_the_recorded_pixels(golden_run, key):
    manifest, lat, out = golden_run
    assert manifest["images"] == len(MODES) and manifest["counts"]["dead_lettered"] == 0
    decoded = pixels(os.path.join(out, key + ".png"))
    golden = pixels(os.path.join(GOLDEN, "decoded", key + ".png"))
    assert decoded.shape == golden.shape
    assert np.array_equal(decoded, golden), f"{key}: {np.sum(decoded != golden)} values differ from the golden"
    # The colour profile travels with its photo and only with it.
    info = Image.open(os.path.join(out, key + ".png")).info
    assert ("icc_profile" in info) == (key == "profiled")


@pytest.mark.parametrize("key", sorted(MODES))
def test_the_golden_pixels_are_the_photo_as_a_viewer_shows_it(key):
    """The recorded pixels themselves are checked against each photo as a viewer shows it (EXIF
    orientation applied, palette expanded, CMYK converted): close, and far from the same photo
    turned 180 degrees, with its channels swapped, or shifted by one pixel, so that a golden made
    from a wrong decode could not pass."""
    golden = pixels(os.path.join(GOLDEN, "decoded", key + ".png")).astype(np.float64)
    shown = pixels(os.path.join(GOLDEN, "upright", key + ".png")).astype(np.float64)
    assert golden.shape == shown.shape == (80, 112, 1 if key in ("grey", "sixteen") else 3)
    quality = psnr(shown[None], golden[None])[0]
    assert quality > 26, (key, quality)
    assert quality > psnr(shown[None], golden[::-1, ::-1][None])[0] + 10
    assert quality > psnr(shown[None], np.roll(golden, 1, axis=1)[None])[0] + 1.5
    if golden.shape[-1] == 3:
        assert quality > psnr(shown[None], golden[..., ::-1][None])[0] + 10


def test_the_latent_rows_record_each_photos_source_form(golden_run):
    """The rows say what each photo was (mode, channels); the API decodes the same pixels as the job."""
    import pyarrow.parquet as pq

    from pipeline import latents

    manifest, lat, _ = golden_run
    table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read()
    assert dict(zip(table.column("key").to_pylist(), table.column("mode").to_pylist())) == MODES
    ds = latentpack.open(lat)
    assert sorted(ds.keys) == KEYS
    for key in KEYS:
        np.testing.assert_array_equal(ds[key]["image"], pixels(os.path.join(GOLDEN, "decoded", key + ".png")))
