import io

import pytest

from pipeline.errors import BadImage
from pipeline.tfrecord import frame, make_example, parse_example, read_records


def test_frames_round_trip():
    data = b"".join(frame(r) for r in [b"a", b"", b"x" * 1000])
    assert [r for _, r in read_records(io.BytesIO(data))] == [b"a", b"", b"x" * 1000]


def test_framing_matches_tensorflow(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "check.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        w.write(b"hello")
        w.write(b"world")
    with open(path, "rb") as f:
        assert f.read() == frame(b"hello") + frame(b"world")


def test_bad_data_crc_skips_one_record():
    good, bad = frame(b"first"), bytearray(frame(b"second"))
    bad[14] ^= 0xFF  # flip a data byte
    out = list(read_records(io.BytesIO(good + bytes(bad) + frame(b"third"))))
    assert out[0] == (0, b"first")
    assert isinstance(out[1][1], BadImage) and out[1][1].reason == "bad_crc"
    assert out[2] == (2, b"third")


def test_a_broken_length_field_is_one_bad_crc_for_the_rest_of_the_shard():
    """A flipped bit in a record's length field: the framing is lost, so the rest of the shard is one
    `bad_crc` dead letter (never records read from the wrong offsets)."""
    first = frame(b"first")
    data = bytearray(first + frame(b"second") + frame(b"third"))
    data[len(first) + 2] ^= 0xFF
    out = list(read_records(io.BytesIO(bytes(data))))
    assert out[0] == (0, b"first") and len(out) == 2 and out[1][1].reason == "bad_crc"


@pytest.mark.parametrize("cut", [3, 12, 15])
def test_truncated_file_reports_once(cut):
    data = frame(b"first") + frame(b"second")[:cut]
    out = list(read_records(io.BytesIO(data)))
    assert out[0] == (0, b"first")
    assert len(out) == 2 and out[1][1].reason == "truncated"


def test_example_round_trip():
    encoded, key, label = parse_example(make_example(b"png-bytes", "a/b", 7))
    assert (encoded, key, label) == (b"png-bytes", "a/b", 7)
    assert parse_example(make_example(b"x")) == (b"x", None, None)


def test_example_without_image_is_bad():
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    ex.features.feature["image/key"].bytes_list.value.append(b"k")
    with pytest.raises(BadImage) as e:
        parse_example(ex.SerializeToString())
    assert e.value.reason == "missing_image"
    with pytest.raises(BadImage):
        parse_example(b"\xff\xff\xff")


def test_beam_tfrecord_io_reads_and_writes_our_framing(tmp_path):
    """Beam's own TFRecord IO needs a crc32c implementation installed (google-crc32c here):
    it reads shards framed by pipeline/tfrecord.py, and writes shards that read_records accepts."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from conftest import BEAM_TEST_ARGS

    records = [f"record {i}".encode() * (i + 1) for i in range(5)]
    ours = tmp_path / "ours.tfrecord"
    ours.write_bytes(b"".join(frame(r) for r in records))
    with beam.Pipeline(argv=BEAM_TEST_ARGS) as p:
        read = p | beam.io.ReadFromTFRecord(str(ours))
        assert_that(read, equal_to(records))
        p | "Create" >> beam.Create(records) | beam.io.WriteToTFRecord(str(tmp_path / "beam"), num_shards=1)
    [written] = list(tmp_path.glob("beam-*"))
    with open(written, "rb") as f:
        assert sorted(r for _, r in read_records(f)) == sorted(records)
