import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import BadImage
from pipeline.images import DeadLetter, ImageBatch, SourceRecord, batch_records, decode_image, decode_photo, encode_png


def png(arr, mode=None, **kw):
    out = io.BytesIO()
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(out, format="PNG", **kw)
    return out.getvalue()


def test_png_round_trip_is_lossless(mnist):
    image = mnist[0][0]
    assert np.array_equal(decode_image(encode_png(image), (28, 28, 1)), image)


def test_rgb_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_png(image), (32, 32, 3)), image)


def animation(frames, fmt, shape=(28, 28)):
    out = io.BytesIO()
    images = [Image.fromarray(np.full(shape, 40 * i, np.uint8)) for i in range(frames)]
    images[0].save(out, format=fmt, save_all=True, append_images=images[1:])
    return out.getvalue()


@pytest.mark.parametrize("frames,fmt", [(3, "GIF"), (2, "PNG"), (2, "WEBP"), (2, "TIFF")])
def test_animations_and_multi_page_files_are_dead_letters(frames, fmt):
    data = animation(frames, fmt)
    for decode in (lambda: decode_image(data, (28, 28, 1)), lambda: decode_photo(data)):
        with pytest.raises(BadImage) as e:
            decode()
        assert e.value.reason == "animated" and f"{frames} frames" in str(e.value)
    # One frame of the same formats is an ordinary image.
    assert decode_photo(animation(1, fmt)).pixels.shape[:2] == (28, 28)


def test_a_camera_mpo_jpeg_is_its_first_picture():
    from pipeline.images import decode_photo

    out = io.BytesIO()
    main, preview = (Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (200, 30))
    main.save(out, format="MPO", save_all=True, append_images=[preview])
    photo = decode_photo(out.getvalue())
    assert photo.pixels.shape == (24, 32, 3) and abs(int(photo.pixels.mean()) - 200) <= 2


@pytest.mark.parametrize("data,shape,reason", [
    (b"not an image", (28, 28, 1), "undecodable"),
    (png(np.zeros((20, 28), np.uint8)), (28, 28, 1), "wrong_size"),
    (png(np.zeros((28, 28, 3), np.uint8)), (28, 28, 1), "wrong_channels"),
    (png(np.zeros((28, 28), np.uint8)), (28, 28, 3), "wrong_channels"),
    (png(np.zeros((28, 28), np.uint16) + 300), (28, 28, 1), "wrong_mode"),
    (png(np.zeros((28, 28, 4), np.uint8)), (28, 28, 3), "wrong_channels"),
])
def test_bad_images_raise_with_reason(data, shape, reason):
    with pytest.raises(BadImage) as e:
        decode_image(data, shape)
    assert e.value.reason == reason


def test_truncated_png_is_undecodable(mnist):
    data = encode_png(mnist[0][0])
    with pytest.raises(BadImage) as e:
        decode_image(data[: len(data) // 2], (28, 28, 1))
    assert e.value.reason == "undecodable"


def test_pixel_limit_checked_from_header():
    data = png(np.zeros((100, 100), np.uint8))
    with pytest.raises(BadImage) as e:
        decode_image(data, (100, 100, 1), max_pixels=5000)
    assert e.value.reason == "too_many_pixels"


def test_a_header_past_pillows_own_bomb_limit_is_too_many_pixels_too():
    """A JPEG whose header claims 65,500 x 65,500 (4.3 Gpx, past twice Pillow's MAX_IMAGE_PIXELS,
    which Pillow refuses itself while opening) is the same decompression bomb as one under it."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = (65500).to_bytes(2, "big") * 2
    for call in (lambda: decode_image(bytes(data), (16, 16, 3)), lambda: decode_photo(bytes(data))):
        with pytest.raises(BadImage) as e:
            call()
        assert e.value.reason == "too_many_pixels" and "4290250000 pixels" in str(e.value)


def test_gray_palette_png_decodes_to_one_channel(mnist):
    gray = Image.fromarray(mnist[0][0, ..., 0]).convert("P")
    out = io.BytesIO()
    gray.save(out, format="PNG")
    assert np.array_equal(decode_image(out.getvalue(), (28, 28, 1))[..., 0], mnist[0][0, ..., 0])


def test_batch_records_keeps_order_and_accounts_for_everything(mnist):
    images = mnist[0][:7]
    records = [SourceRecord(f"k{i}", "s", i, encoded=encode_png(images[i])) for i in range(7)]
    records.insert(3, SourceRecord("bad", "s", 99, encoded=b"junk"))
    records.insert(5, SourceRecord("arr", "s", 98, pixels=images[0][..., 0]))
    records.append(SourceRecord("broken", "s", 97, error=BadImage("bad_crc", "crc")))
    out = list(batch_records(records, (28, 28, 1), batch_size=3))
    batches = [o for o in out if isinstance(o, ImageBatch)]
    letters = [o for o in out if isinstance(o, DeadLetter)]
    assert [len(b) for b in batches] == [3, 3, 2]
    keys = [k for b in batches for k in b.keys]
    assert keys == ["k0", "k1", "k2", "k3", "arr", "k4", "k5", "k6"]
    assert np.array_equal(np.concatenate([b.images for b in batches])[4], images[0])
    assert [(d.key, d.reason) for d in letters] == [("bad", "undecodable"), ("broken", "bad_crc")]
    assert all(not b.has_label.any() for b in batches)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"compress_level": 0}])
def test_libspng_path_matches_pillow(channels, options):
    """8-bit grey/RGB PNGs are decoded by libspng; the pixels are exactly Pillow's."""
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (32, 30, channels), dtype=np.uint8)
    image[:8] = 0  # some flat rows, so that PNG's filters and compression have work to do
    data = png(image[..., 0] if channels == 1 else image, **options)
    expected = np.asarray(Image.open(io.BytesIO(data))).reshape(image.shape)
    assert np.array_equal(decode_image(data, (32, 30, channels)), expected)
    assert np.array_equal(expected, image)


def test_libspng_path_rejects_corrupt_pixel_data(mnist):
    data = bytearray(encode_png(mnist[0][0]))
    data[60] ^= 0xFF  # inside IDAT: its CRC no longer matches
    with pytest.raises(BadImage) as e:
        decode_image(bytes(data), (28, 28, 1))
    assert e.value.reason == "undecodable"


def test_a_colour_profile_is_kept_only_for_the_pixels_it_describes():
    """`profile_for` (killed mutants of `make mutate`): an RGB profile for 3 channels, a GRAY one
    for 1, nothing for the other count, a header without `acsp`, or bytes too short to be one."""
    from PIL import ImageCms

    from pipeline.images import profile_for

    rgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    grey = rgb[:16] + b"GRAY" + rgb[20:]  # the same header naming the GRAY colour space
    assert profile_for(rgb, 3) == rgb and profile_for(rgb, 1) is None
    assert profile_for(grey, 1) == grey and profile_for(grey, 3) is None
    assert profile_for(rgb[:36] + b"xxxx" + rgb[40:], 3) is None
    assert profile_for(rgb[:100], 3) is None and profile_for(None, 3) is None and profile_for(b"", 1) is None
