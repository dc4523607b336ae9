"""The spatial photo codec: GDN, padding and cropping, tiles, mixed sizes and modes through the
jobs, resumable training, and decoding identical on another process with other TF settings."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import BEAM_TEST_ARGS, smooth_photos
from pipeline import completion, decode, encode, latents
from pipeline.artifact import read_spec
from pipeline.codec import load_codec, schema_of
from families.spatial import codec as spatial_codec
from pipeline.errors import LatentpackError
from pipeline.images import DEFAULT_MAX_PIXELS, ImageBatch, SourceRecord, batch_photos, decode_photo, encode_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gdn_matches_its_formula_and_keeps_parameters_positive():
    import tensorflow as tf

    from families.spatial.layers import GDN

    layer = GDN()
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    layer.build(x.shape)
    layer.gamma_v.assign(np.abs(layer.gamma_v.numpy()) + 0.1)
    beta, gamma = layer.beta.numpy(), layer.gamma.numpy()
    expected = x / np.sqrt(beta + np.einsum("...j,ij->...i", x ** 2, gamma))
    assert np.allclose(layer(x).numpy(), expected, rtol=1e-5)
    inverse = GDN(inverse=True)
    inverse.build(x.shape)
    assert np.allclose(inverse(x).numpy(), x * np.sqrt(inverse.beta.numpy() + np.einsum(
        "...j,ij->...i", x ** 2, inverse.gamma.numpy())), rtol=1e-5)
    # Reparameterized: whatever the raw variables become, beta stays > 0 and gamma >= 0.
    layer.beta_v.assign(-tf.ones_like(layer.beta_v))
    layer.gamma_v.assign(-tf.ones_like(layer.gamma_v))
    assert layer.beta.numpy().min() > 0 and layer.gamma.numpy().min() >= 0
    assert np.isfinite(layer(x).numpy()).all()


def test_artifact_is_format_2_spatial(spatial_model_dir):
    spec = read_spec(spatial_model_dir)
    assert (spec.format_version, spec.family, spec.stride, spec.latent_channels) == (3, "spatial", 16, 8)
    assert spec.arch == "spatial" and spec.training["steps_done"] == 40
    assert len(spec.entropy_model["frequencies"]) == 8
    assert spec.metrics["val_bpp"] > 0 and spec.metrics["val_psnr"] > 5
    assert os.path.exists(os.path.join(spatial_model_dir, "loss.png"))


def test_kernels_are_stored_as_int8_with_a_scale_per_filter(photo_model_dir):
    import tensorflow as tf

    from families.spatial.transforms import dequantize, stored_kernel

    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(5, 5, 6, 7)) * rng.uniform(1e-4, 1.0, size=(1, 1, 6, 7))
    kernel[:, :, 2, 3] = 0.0  # an all-zero filter keeps a usable scale
    q, scale = stored_kernel(kernel.astype(np.float32))
    assert q.dtype == tf.int8 and scale.shape == (1, 1, 6, 7) and np.abs(q.numpy()).max() == 127
    back = dequantize(q, scale, tf.float64).numpy()
    peak = np.abs(kernel).max(axis=(0, 1), keepdims=True)
    assert (np.abs(back - kernel) <= peak / 254 * 1.0001 + 1e-12).all()  # half a step of each filter's own scale
    assert (back[:, :, 2, 3] == 0).all()
    half, none = stored_kernel(kernel, "float16")
    assert half.dtype == tf.float16 and none is None
    # Exported artifacts hold int8 kernels (and no float16 ones) for every convolution.
    reader = tf.train.load_checkpoint(os.path.join(photo_model_dir, "variables", "variables"))
    kernels = {k: d for k, d in reader.get_variable_to_dtype_map().items()
               if len(reader.get_variable_to_shape_map()[k]) == 4 and not k.startswith(("hyper_kernels", "integer_kernels"))}  # integer networks: int16
    assert kernels and {d.name for d in kernels.values()} <= {"int8", "float32"}
    assert sum(d == tf.int8 for d in kernels.values()) == sum(d == tf.float32 for d in kernels.values())


def test_kernel_storage_float16_exports_the_same_checkpoint_the_other_way(spatial_model_dir, photo_folder, tmp_path):
    import shutil

    import tensorflow as tf

    from training.loop import PhotoConfig, train

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(os.path.dirname(spatial_model_dir), "checkpoints"), checkpoints)
    config = PhotoConfig(filters=16, latent_channels=8, crop=32, batch_size=4, steps=40, learning_rate=1e-3,
                           checkpoint_every=20, validate_every=40, val_images=2, holdout_every=6,
                           kernel_storage="float16")
    spec = train(config, str(photo_folder / "*.png"), "images", str(tmp_path / "half"), str(checkpoints), resume=True)
    assert spec["training"]["steps_done"] == 40 and spec["training"]["kernel_storage"] == "float16"
    reader = tf.train.load_checkpoint(str(tmp_path / "half" / "variables" / "variables"))
    dtypes = {d.name for k, d in reader.get_variable_to_dtype_map().items()
              if len(reader.get_variable_to_shape_map()[k]) == 4}
    assert dtypes == {"float16"}
    int8 = read_spec(spatial_model_dir)
    assert int8.training["kernel_storage"] == "int8"
    assert abs(spec["metrics"]["val_psnr"] - int8.metrics["val_psnr"]) < 0.1


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (16, 16), (45, 7)])
def test_compress_pads_and_decompress_crops_back_to_the_exact_size(photo_model_dir, size):
    codec = load_codec(photo_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(1), 2, sizes=[size]))
    for latent_format in ("code", "int"):
        columns = codec.compress(ImageBatch(["a", "b"], images, np.array([3, -1]), np.array([True, False])),
                                 latent_format)
        schema = schema_of(codec.spec, latent_format)
        table = latents.to_table(["a", "b"], columns, np.array([3, -1]), np.array([True, False]), schema)
        assert table.column("height").to_pylist() == [size[0]] * 2 and table.column("width").to_pylist() == [size[1]] * 2
        (batch,) = list(codec.decompress(table))
        assert batch.images.shape == (2,) + size + (3,) and batch.keys == ["a", "b"]
        assert batch.labels.tolist() == [3, -1] and batch.has_label.tolist() == [True, False]


def test_a_row_claiming_more_pixels_than_the_limit_is_a_dead_letter_not_decoded(photo_model_dir):
    """Height and width are data: a few bytes of code (the decoder reads zeros past a code's end)
    could claim gigapixels. Past the limit a row is refused before decoding; a long, thin image
    (wider than 65,536) within it decodes at its size."""
    import pyarrow as pa

    codec = load_codec(photo_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(4), 2, sizes=[(3, 70000)]))
    columns = codec.compress(ImageBatch(["wide", "bomb"], images, np.array([-1, -1]), np.array([False, False])),
                             "code")
    table = latents.to_table(["wide", "bomb"], columns, np.array([-1, -1]), np.array([False, False]),
                             schema_of(codec.spec, "code"))
    table = table.set_column(table.schema.get_field_index("height"), "height", pa.array([3, 65536], pa.int32()))
    table = table.set_column(table.schema.get_field_index("width"), "width", pa.array([70000, 65536], pa.int32()))
    table = table.set_column(table.schema.get_field_index("code"), "code",
                             pa.array([columns["code"][0].as_py(), b""], pa.binary()))
    out = list(codec.decompress(table, max_pixels=1 << 20))
    letters = [o for o in out if not isinstance(o, ImageBatch)]
    assert [(d.key, d.reason) for d in letters] == [("bomb", "too_many_pixels")]
    assert "65536x65536 exceeds the 1048576-pixel limit" in letters[0].error
    (batch,) = [o for o in out if isinstance(o, ImageBatch)]
    assert batch.keys == ["wide"] and batch.images.shape == (1, 3, 70000, 3)
    # A limit below the wide image's 210,000 pixels refuses it too.
    assert [o.reason for o in codec.decompress(table.slice(0, 1), max_pixels=200000)] == ["too_many_pixels"]


def test_decode_limits_pixels_as_the_encode_job_did(photo_model_dir, photo_folder, tmp_path):
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    manifest = encode.run(["--input", str(photo_folder / "img0*.png"), "--input-format", "images",
                           "--model-dir", photo_model_dir, "--output", lat, "--max-pixels", "100000000"]
                          + BEAM_TEST_ARGS)
    assert manifest["max_pixels"] == 100000000 and manifest["counts"]["written"] == 10
    assert decode.pixel_limit(None, manifest) == 100000000
    assert decode.pixel_limit(None, {}) == DEFAULT_MAX_PIXELS  # datasets before 0.4.1
    assert decode.pixel_limit(5000, manifest) == 5000
    with pytest.raises(LatentpackError, match="--max-pixels must be at least 1"):
        decode.pixel_limit(0, manifest)
    assert decode.run(["--input", lat, "--model-dir", photo_model_dir, "--output", out]
                      + BEAM_TEST_ARGS)["max_pixels"] == 100000000
    # Below the photos' sizes: each is a `too_many_pixels` dead letter, and the job fails unmarked.
    sizes = table_sizes(lat, manifest)
    limit = min(h * w for h, w in sizes) - 1
    with pytest.raises(LatentpackError, match="too_many_pixels"):
        decode.run(["--input", lat, "--model-dir", photo_model_dir, "--output", str(tmp_path / "small"),
                    "--max-pixels", str(limit)] + BEAM_TEST_ARGS)
    assert not os.path.exists(tmp_path / "small" / completion.MANIFEST)


def table_sizes(lat, manifest):
    table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read()
    return list(zip(table.column("height").to_pylist(), table.column("width").to_pylist()))


def test_tiled_transforms_match_the_whole_image(photo_model_dir, monkeypatch):
    codec = load_codec(photo_model_dir)
    image = np.stack(smooth_photos(np.random.default_rng(2), 1, sizes=[(160, 208)]))
    whole_latent, whole = codec.analysis(image), None
    whole = codec.synthesis(whole_latent)
    monkeypatch.setattr(spatial_codec, "TILE_ABOVE", 32 * 32)
    monkeypatch.setattr(spatial_codec, "TILE", 64)
    monkeypatch.setattr(spatial_codec, "SYNTHESIS_PIXELS", 32 * 32)
    monkeypatch.setattr(spatial_codec, "SYNTHESIS_TILE", 64)
    monkeypatch.setattr(spatial_codec, "MARGIN", 64)
    tiled_latent = codec.analysis(image)
    assert tiled_latent.shape == whole_latent.shape
    # Tiles see the same pixels as the whole image within their margin: at most float rounding differs.
    assert np.mean(tiled_latent == whole_latent) > 0.999
    tiled = codec.synthesis(whole_latent)
    assert tiled.shape == whole.shape and np.abs(tiled.astype(int) - whole).max() <= 1


def test_transforms_see_a_bounded_number_of_pixels_per_call(photo_model_dir, monkeypatch):
    """A batch of photos goes through the transforms in groups of at most TILE_ABOVE pixels (memory
    follows the call: sixteen 1024x768 photos at once took 7.2 GB to decode), the same result."""
    codec = load_codec(photo_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(4), 5, sizes=[(48, 64)]))
    latent, decoded = codec.analysis(images), codec.synthesis(codec.analysis(images))
    calls = []
    for name in ("_encode", "_decode"):
        original = getattr(codec, name)

        def spy(original=original, **kw):
            calls.append(next(iter(kw.values())).shape[0])
            return original(**kw)
        monkeypatch.setattr(codec, name, spy)
    monkeypatch.setattr(spatial_codec, "TILE_ABOVE", 2 * 48 * 64)
    monkeypatch.setattr(spatial_codec, "SYNTHESIS_PIXELS", 3 * 48 * 64)  # the float64 synthesis: its own bound
    assert np.array_equal(codec.analysis(images), latent)
    assert np.array_equal(codec.synthesis(latent), decoded)
    assert calls == [2, 2, 1, 3, 2]


def test_decoding_rows_of_many_sizes_holds_a_bounded_number_of_pixels(photo_model_dir, monkeypatch):
    """A part of camera photos: rows of one size leave for the synthesis in batches of at most
    DECODE_PIXELS (a larger image alone), and rows of many sizes do not all wait for the end of
    the table (before, a 1,024-row batch of 24-megapixel photos held every latent at once and
    decoded sixteen photos per batch). The images are those the default batches give."""
    import pyarrow as pa

    codec = load_codec(photo_model_dir)
    sizes = [(16 + 8 * (i % 5), 24 + 8 * (i % 2)) for i in range(30)]  # 10 shapes, each three times
    images = smooth_photos(np.random.default_rng(6), 30, sizes=sizes)
    schema = schema_of(codec.spec, "code")
    no = np.array([-1]), np.array([False])
    table = pa.concat_tables([latents.to_table([f"k{i:02d}"], codec.compress(ImageBatch([f"k{i:02d}"], x[None], *no),
                                                                             "code"), *no, schema)
                              for i, x in enumerate(images)])
    expected = {k: x for b in codec.decompress(table) for k, x in zip(b.keys, b.images)}
    monkeypatch.setattr(spatial_codec, "DECODE_PIXELS", 3000)
    got, waiting, pixels, sizes_out = {}, [], [h * w for h, w in sizes], []
    original = codec.coder.decode

    def spy(*args, **kwargs):  # before each row: rows decoded to latents and not yet out as images, in pixels
        done = len(waiting)
        waiting.append(sum(pixels[:done]) - sum(pixels[int(k[1:])] for k in got))
        return original(*args, **kwargs)

    monkeypatch.setattr(codec.coder, "decode", spy)
    for batch in codec.decompress(table):
        assert (len(batch) - 1) * batch.images.shape[1] * batch.images.shape[2] < 3000  # leaves once it reaches 3000
        got.update(zip(batch.keys, batch.images))
        sizes_out.append(len(batch))
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    assert max(waiting) <= 2 * 3000 and max(sizes_out) > 1  # same-sized rows still go together


def test_batch_photos_groups_same_shapes_and_bounds_batches():
    rng = np.random.default_rng(3)
    images = smooth_photos(rng, 9, sizes=[(20, 30), (30, 20), (20, 30)])
    records = [SourceRecord(f"k{i}", "s", i, encoded=encode_png(x), label=i) for i, x in enumerate(images)]
    records.append(SourceRecord("bad", "s", 9, encoded=b"not an image"))
    out = list(batch_photos(records, batch_size=2))
    letters = [o for o in out if not isinstance(o, ImageBatch)]
    batches = [o for o in out if isinstance(o, ImageBatch)]
    assert [(d.key, d.reason) for d in letters] == [("bad", "undecodable")]
    assert sorted(k for b in batches for k in b.keys) == sorted(f"k{i}" for i in range(9))
    for b in batches:
        assert len(b) <= 2 and all(np.array_equal(images[int(k[1:])], x) for k, x in zip(b.keys, b.images))
        assert b.labels.tolist() == [int(k[1:]) for k in b.keys]
    # A pixel budget: a large photo travels alone.
    big = [SourceRecord(f"b{i}", "s", i, pixels=np.zeros((100, 100, 3), np.uint8)) for i in range(3)]
    assert [len(b) for b in batch_photos(big, batch_size=8, batch_pixels=15000)] == [2, 1]


def test_batch_photos_bounds_the_images_waiting_in_all_shapes():
    """A shard of photos of many sizes (a web crawl): each shape's batch would wait for the end of
    the shard; past `pending_pixels` waiting in all of them, the fullest leaves early."""
    sizes, seen, waiting = {}, set(), []

    def records():
        for i in range(40):  # 20 shapes, each seen twice, 20 records apart
            waiting.append(sum(p for k, p in sizes.items() if k not in seen))  # before reading the next
            h = 10 + i % 20
            sizes[f"k{i}"] = h * 10
            yield SourceRecord(f"k{i}", "s", i, pixels=np.full((h, 10, 3), i, np.uint8))

    batches = []
    for batch in batch_photos(records(), batch_size=8, pending_pixels=1000):
        seen.update(batch.keys)
        batches.append(batch)
        assert all((x == int(k[1:])).all() for k, x in zip(batch.keys, batch.images))
    assert sorted(seen) == sorted(sizes)
    assert max(waiting) <= 1000 and len(batches) > 20  # without the bound: 20 batches, all 40 images waiting
    assert max(len(b) for b in batches) <= 2


def _modes_folder(folder):
    """Photos of mixed sizes, orientations and pixel modes, as users have them."""
    rng = np.random.default_rng(4)
    rgb = smooth_photos(rng, 4, sizes=[(40, 56), (56, 40), (23, 71), (33, 33)])
    for i, x in enumerate(rgb):
        Image.fromarray(x).save(folder / f"rgb{i}.png")
    base = Image.fromarray(rgb[0])
    base.convert("L").save(folder / "grey.png")
    base.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    base.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees
    base.save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGBA", (30, 20), (1, 2, 3, 100)).save(folder / "transparent.png")
    Image.new("RGBA", (30, 20), (1, 2, 3, 255)).save(folder / "opaque_alpha.png")
    Image.fromarray(np.zeros((10, 10), np.float32), "F").save(folder / "float.tiff")
    base.save(folder / "profiled.png", icc_profile=ICC)
    base.save(folder / "profiled_jpg.jpg", icc_profile=ICC, quality=95)
    return rgb


def _rgb_profile() -> bytes:
    """An RGB ICC profile (littleCMS's sRGB: any RGB profile is carried as bytes)."""
    from PIL import ImageCms
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return profile.tobytes()


ICC = _rgb_profile()


def _cmyk_profile() -> bytes:
    """A tiny CMYK printer profile (ICC v2, a lut8 A2B0 with 2 grid points to Lab): littleCMS converts
    with it, to colours that differ from Pillow's plain CMYK conversion (no CMYK profile ships in a wheel)."""
    import itertools
    import struct

    def s15(v):
        return struct.pack(">i", int(round(v * 65536)))

    def lab(rgb):
        linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
        f = np.cbrt(np.maximum(xyz / np.array([0.9505, 1.0, 1.089]), 216 / 24389))
        return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])

    clut = bytearray()
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        L, a, b = lab(np.array([1 - c, 1 - m, 1 - y]) * (1 - k) * 0.9 + 0.05)
        clut += bytes([round(L * 2.55), round(a + 128), round(b + 128)])
    ramp = bytes(range(256))
    identity = b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    text = b"test CMYK\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8 + 70)),
            (b"wtpt", b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)),
            (b"cprt", b"text" + bytes(4) + b"none\0"),
            (b"A2B0", b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + identity + ramp * 4 + bytes(clut) + ramp * 3)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
              + bytes(12) + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    return header + table + data


def test_mixed_sizes_and_modes_round_trip_through_the_jobs(photo_model_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = _modes_folder(photos)
    lat, out = str(tmp_path / "lat"), str(tmp_path / "out")
    manifest = encode.run(["--input", str(photos / "*"), "--input-format", "images", "--model-dir", photo_model_dir,
                           "--output", lat, "--max-bad-fraction", "0.5"] + BEAM_TEST_ARGS)
    c = manifest["counts"]
    assert (c["read"], c["written"]) == (14, 12)
    # Each part records the run of input shards (here one file each) it holds: first, last, how many.
    from pipeline.sinks import read_sources
    files = sorted(str(f) for f in photos.iterdir())
    runs = [read_sources(pq.read_metadata(p).metadata) for p in latents.part_paths(lat, manifest)]
    assert [(r["first"], r["last"], r["shards"]) for r in runs] == [(files[0], files[-1], 14)]
    assert c["dead_lettered_by_reason"] == {"transparent": 1, "wrong_mode": 1}
    table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read().sort_by("key")
    modes = dict(zip(table.column("key").to_pylist(), table.column("mode").to_pylist()))
    assert modes["cmyk"] == "CMYK" and modes["sixteen"] == "I;16" and modes["palette"] == "P"
    assert modes["grey"] == "L" and modes["opaque_alpha"] == "RGBA"
    channels = dict(zip(table.column("key").to_pylist(), table.column("channels").to_pylist()))
    assert channels["grey"] == 1 and channels["sixteen"] == 1 and channels["cmyk"] == 3
    # Embedded colour profiles are kept per row (the pixels are coded in their colour space) ...
    profiles = dict(zip(table.column("key").to_pylist(), table.column("icc_profile").to_pylist()))
    assert profiles.pop("profiled") == profiles.pop("profiled_jpg") == ICC
    assert set(profiles.values()) == {None}
    # ... dictionary-encoded, without min/max statistics (two whole profiles per page and footer).
    meta = pq.ParquetFile(latents.part_paths(lat, manifest)[0]).metadata.row_group(0)
    icc_chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "icc_profile")
    assert icc_chunk.statistics is None and "RLE_DICTIONARY" in icc_chunk.encodings

    decode.run(["--input", lat, "--model-dir", photo_model_dir, "--output", out] + BEAM_TEST_ARGS)
    for i, x in enumerate(rgb):
        back = np.asarray(Image.open(os.path.join(out, f"rgb{i}.png")))
        assert back.shape == x.shape
    assert Image.open(os.path.join(out, "grey.png")).mode == "L"
    assert Image.open(os.path.join(out, "sixteen.png")).mode == "L"
    # EXIF orientation applied: stored 40x56 landscape-rotated, shown (and decoded) as 56 wide, 40 high, turned.
    assert Image.open(os.path.join(out, "rotated.png")).size == (40, 56)
    assert not os.path.exists(os.path.join(out, "transparent.png"))
    # ... and the decoded images carry them again; the others have none.
    assert Image.open(os.path.join(out, "profiled.png")).info["icc_profile"] == ICC
    assert "icc_profile" not in Image.open(os.path.join(out, "rgb0.png")).info


def test_an_image_folders_files_share_batches(spatial_model_dir, photo_folder, tmp_path, monkeypatch):
    """Files of a folder are read in runs (`encode.work_units`), so small images of one size go
    through the model together, not one call per file; every file is still accounted for."""
    cls = type(load_codec(spatial_model_dir))
    original, calls = cls.compress, []

    def spy(self, batch, *args, **kwargs):
        calls.append(len(batch))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(cls, "compress", spy)
    lat = str(tmp_path / "lat")
    manifest = encode.run(["--input", str(photo_folder / "*.png"), "--input-format", "images",
                           "--model-dir", spatial_model_dir, "--output", lat] + BEAM_TEST_ARGS)
    assert manifest["images"] == 24 and manifest["counts"]["read"] == 24
    assert sorted(calls) == [8, 8, 8]  # three sizes of eight photos each
    table = pq.ParquetDataset(latents.part_paths(lat, manifest)).read()
    assert sorted(table.column("key").to_pylist()) == [f"img{i:02d}" for i in range(24)]


def test_decode_photo_conversions():
    rgb = smooth_photos(np.random.default_rng(5), 1, sizes=[(12, 20)])[0]

    def as_bytes(img, fmt="PNG", **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    grey = decode_photo(as_bytes(Image.fromarray(rgb).convert("L")))
    assert grey.pixels.shape == (12, 20, 1) and grey.mode == "L"
    sixteen = decode_photo(as_bytes(Image.fromarray(np.full((4, 5), 0xABCD, np.uint16))))
    assert sixteen.mode == "I;16" and (sixteen.pixels == 0xAB).all()
    palette = decode_photo(as_bytes(Image.fromarray(rgb).convert("L").convert("P")))
    assert palette.pixels.shape[-1] == 1 and palette.mode == "P"
    cmyk = decode_photo(as_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.pixels.shape == (12, 20, 3) and cmyk.mode == "CMYK"
    # Colour profiles: kept when they describe the stored pixels, on PNG (not libspng's path) and JPEG.
    for fmt in ("PNG", "JPEG"):
        assert decode_photo(as_bytes(Image.fromarray(rgb), fmt, icc_profile=ICC)).icc == ICC
    assert decode_photo(as_bytes(Image.fromarray(rgb))).icc is None
    # An RGB profile on a grey palette (decoded to one channel), or bytes that are no profile: dropped.
    grey_palette = Image.fromarray(rgb).convert("L").convert("P")
    assert decode_photo(as_bytes(grey_palette, icc_profile=ICC)).icc is None
    assert decode_photo(as_bytes(Image.fromarray(rgb), icc_profile=b"not a profile" * 20)).icc is None
    # A CMYK image's profile is applied (to sRGB), never kept; a damaged one falls back to Pillow's conversion.
    from PIL import ImageCms
    cmyk_icc = _cmyk_profile()
    data = as_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95, icc_profile=cmyk_icc)
    managed = decode_photo(data)
    srgb = ImageCms.profileToProfile(Image.open(io.BytesIO(data)), ImageCms.ImageCmsProfile(io.BytesIO(cmyk_icc)),
                                     ImageCms.createProfile("sRGB"), outputMode="RGB")
    assert managed.icc is None and managed.mode == "CMYK" and np.array_equal(managed.pixels, np.asarray(srgb))
    assert np.abs(managed.pixels.astype(int) - cmyk.pixels).mean() > 5  # not the plain conversion
    broken = decode_photo(as_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95, icc_profile=b"x" * 200))
    assert broken.icc is None and np.array_equal(broken.pixels, cmyk.pixels)
    # 32-bit integers (TIFF) have no canonical 8-bit reading: a dead letter, not a black picture.
    from pipeline.errors import BadImage
    with pytest.raises(BadImage, match="32-bit integer TIFF") as e:
        decode_photo(as_bytes(Image.fromarray(np.full((4, 5), 200, np.int32)), "TIFF"))
    assert e.value.reason == "wrong_mode"


def test_training_resumes_from_its_checkpoint(tmp_path, photo_folder):
    from training.loop import PhotoConfig, train

    config = PhotoConfig(filters=8, latent_channels=4, crop=32, batch_size=2, steps=6, checkpoint_every=3,
                           validate_every=6, val_images=1, holdout_every=6)
    ckpt = str(tmp_path / "ck")
    first = train(config, str(photo_folder / "*.png"), "images", str(tmp_path / "a"), ckpt)
    assert first["training"]["steps_done"] == 6
    history = json.load(open(os.path.join(ckpt, "history.json")))
    assert [r["step"] for r in history["val"]] == [6]
    longer = PhotoConfig(**dict(config.__dict__, steps=9))
    second = train(longer, str(photo_folder / "*.png"), "images", str(tmp_path / "b"), ckpt, resume=True)
    assert second["training"]["steps_done"] == 9
    assert [r["step"] for r in json.load(open(os.path.join(ckpt, "history.json")))["val"]] == [6, 9]


def test_training_never_sees_held_out_images(photo_folder):
    from training.data import is_holdout, photos
    from training.loop import PhotoConfig

    config = PhotoConfig(holdout_every=3)
    train_keys = {k for k, _ in photos(str(photo_folder / "*.png"), "images", None, False, 3)}
    held = {k for k, _ in photos(str(photo_folder / "*.png"), "images", None, True, 3)}
    assert train_keys and held and not train_keys & held
    assert all(is_holdout(k, config.holdout_every) for k in held)


DECODE_ELSEWHERE = """
import json, sys
import numpy as np, pyarrow.parquet as pq
from pipeline.codec import load_codec
codec = load_codec(sys.argv[1])
table = pq.read_table(sys.argv[2]).sort_by("key")
out = {}
for batch in codec.decompress(table):
    for key, image in zip(batch.keys, batch.images):
        out[key] = image
np.savez(sys.argv[3], **out)
"""


def test_codes_decode_identically_in_another_process_with_other_settings(photo_model_dir, photo_folder, tmp_path):
    """Integer tables make the latents exact; the decoded pixels must match too, with oneDNN
    off and one thread instead of the default."""
    lat = str(tmp_path / "lat")
    manifest = encode.run(["--input", str(photo_folder / "*.png"), "--input-format", "images",
                           "--model-dir", photo_model_dir, "--output", lat] + BEAM_TEST_ARGS)
    (part,) = latents.part_paths(lat, manifest)
    here = str(tmp_path / "here.npz")
    there = str(tmp_path / "there.npz")
    script = str(tmp_path / "decode_elsewhere.py")
    with open(script, "w") as f:
        f.write(DECODE_ELSEWHERE)
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, script, photo_model_dir, part, here], env=env, check=True, capture_output=True)
    env.update(TF_ENABLE_ONEDNN_OPTS="0", OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="1")
    subprocess.run([sys.executable, script, photo_model_dir, part, there], env=env, check=True, capture_output=True)
    a, b = np.load(here), np.load(there)
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 24
    for key in a.files:
        assert np.array_equal(a[key], b[key]), key
    # And the codes themselves are the same bytes when the same images are encoded again.
    again = str(tmp_path / "again")
    encode.run(["--input", str(photo_folder / "*.png"), "--input-format", "images",
                "--model-dir", photo_model_dir, "--output", again] + BEAM_TEST_ARGS)
    first = pq.read_table(part).sort_by("key").column("code").to_pylist()
    second = pq.ParquetDataset(latents.part_paths(again, completion.read_manifest(again))).read().sort_by("key")
    assert first == second.column("code").to_pylist()


def test_init_from_restores_transforms_and_prior(tmp_path, photo_folder):
    from families.spatial.train import SpatialTrainer
    from training.loop import PhotoConfig, init_weights_from, train

    config = PhotoConfig(filters=8, latent_channels=4, crop=32, batch_size=2, steps=4, checkpoint_every=4,
                           validate_every=4, val_images=1, holdout_every=6)
    ckpt = str(tmp_path / "ck")
    train(config, str(photo_folder / "*.png"), "images", str(tmp_path / "a"), ckpt)
    resumed, fresh = SpatialTrainer(config), SpatialTrainer(config)
    import tensorflow as tf
    resumed.checkpoint.restore(tf.train.latest_checkpoint(ckpt)).assert_existing_objects_matched()
    init_weights_from(fresh, ckpt)
    for a, b in zip(resumed.variables, fresh.variables):
        assert np.array_equal(np.asarray(a), np.asarray(b)), a.name
    assert int(fresh.step) == 0  # a new run: its own step count and optimizer


def test_int_latents_outside_the_tables_are_dead_letters(photo_model_dir):
    import pyarrow as pa

    codec = load_codec(photo_model_dir)
    images = np.stack(smooth_photos(np.random.default_rng(8), 2, sizes=[(32, 32)]))
    columns = codec.compress(ImageBatch(["a", "b"], images, np.array([-1, -1]), np.array([False, False])), "int")
    values = columns["latent"].to_pylist()
    values[1][0] = 30000
    columns["latent"] = pa.array(values, pa.list_(pa.int16()))
    table = latents.to_table(["a", "b"], columns, np.array([-1, -1]), np.array([False, False]),
                             schema_of(codec.spec, "int"))
    out = list(codec.decompress(table))
    letters = [o for o in out if not isinstance(o, ImageBatch)]
    if codec.spec.family == "channelwise":
        # Its tables are centred on predicted means, so a code can hold any int16 latent: so may a row.
        assert not letters and sorted(k for b in out for k in b.keys) == ["a", "b"]
        return
    assert [(d.key, d.reason) for d in letters] == [("b", "bad_latent")]
    assert [b.keys for b in out if isinstance(b, ImageBatch)] == [["a"]]


def test_a_stride_8_model_has_latents_at_an_eighth(tmp_path, photo_folder):
    """--stride 8 (three stages) for very small images: 32x32 gives a 4x4 latent grid."""
    from training.train import main

    assert main(["--arch", "spatial", "--stride", "8", "--input", str(photo_folder / "*.png"), "--input-format",
                 "images", "--filters", "8", "--latent-channels", "4", "--crop", "32", "--batch-size", "2",
                 "--steps", "4", "--validate-every", "4", "--checkpoint-every", "4", "--model-dir",
                 str(tmp_path / "a")]) == 0
    assert read_spec(str(tmp_path / "a")).stride == 8
    codec = load_codec(str(tmp_path / "a"))
    images = np.stack(smooth_photos(np.random.default_rng(9), 2, sizes=[(32, 20)]))
    assert codec.analysis(images).shape == (2, 4, 3, 4)
    columns = codec.compress(ImageBatch(["a", "b"], images, np.array([-1, -1]), np.array([False, False])), "code")
    table = latents.to_table(["a", "b"], columns, np.array([-1, -1]), np.array([False, False]),
                             schema_of(codec.spec, "code"))
    (batch,) = list(codec.decompress(table))
    assert batch.images.shape == (2, 32, 20, 3)
