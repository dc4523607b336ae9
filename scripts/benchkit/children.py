"""The work each benchmark variant does in its own process: plain loops, the naive pipeline,
the per-step profile and the file-creation probe (`python scripts/bench.py --child KIND ...`)."""
from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np


def encode_loop(pattern: str, model_dir: str, output: str) -> None:
    import pyarrow.parquet as pq

    from pipeline import latents
    from pipeline.codec import load_codec, schema_of
    from pipeline.formats import get_reader
    from pipeline.images import ImageBatch, batch_records

    codec = load_codec(model_dir)
    latent_format = codec.default_latent_format(codec.spec)
    schema = schema_of(codec.spec, latent_format)
    reader = get_reader("tfrecord")
    shards, root = reader.match(pattern)
    os.makedirs(output, exist_ok=True)
    with pq.ParquetWriter(os.path.join(output, "latents-00000-of-00001.parquet"), schema, compression="zstd") as w:
        for shard in shards:
            for item in batch_records(reader.records(shard, root), codec.image_shape(codec.spec), 1024):
                if isinstance(item, ImageBatch):
                    columns = codec.compress(item, latent_format)
                    w.write_table(latents.to_table(item.keys, columns, item.labels, item.has_label, schema))


def encode_steps(pattern: str, model_dir: str) -> None:
    """Time each step of the encode work separately over the whole input, start-up excluded."""
    from pipeline import latents
    from PIL import Image

    from pipeline.codec import load_codec, schema_of
    from pipeline.formats import get_reader
    from pipeline.images import batch_records

    codec = load_codec(model_dir)
    reader = get_reader("tfrecord")
    shards, root = reader.match(pattern)
    list(reader.records(shards[0], root))  # first use imports the Example proto; keep it out of the timing
    latent_format = codec.default_latent_format(codec.spec)
    schema = schema_of(codec.spec, latent_format)
    times = {}

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - started
        return result

    records = timed("read TFRecord framing, parse Examples", lambda: [r for s in shards for r in reader.records(s, root)])
    batches = timed("decode PNGs into batches",
                    lambda: list(batch_records(iter(records), codec.image_shape(codec.spec), 1024)))
    timed("model encode (alone, for the split below)", lambda: [codec.encode(b.images) for b in batches])
    values = timed("model encode + entropy coding (compress)", lambda: [codec.compress(b, latent_format)
                                                                        for b in batches])
    timed("Arrow tables", lambda: [latents.to_table(b.keys, v, b.labels, b.has_label, schema)
                                   for b, v in zip(batches, values)])
    # Not part of the job: what the PNG step costs through Pillow instead of libspng.
    timed("(for comparison) decode PNGs with Pillow",
          lambda: [np.asarray(Image.open(io.BytesIO(r.encoded))) for r in records if r.encoded is not None])
    for name, seconds in times.items():
        print(f"{name:<42} {seconds / len(records) * 1e6:6.1f} us/image")


def decode_loop(dataset: str, model_dir: str, output: str, output_format: str = "png") -> None:
    """The decode job's work in a plain loop: one PNG file per image, or one TFRecord shard of
    PNG Examples per Parquet part."""
    import pyarrow.parquet as pq

    from pipeline import completion, latents
    from pipeline.codec import load_codec
    from pipeline.outputs import PngFiles, TFRecordShard

    codec = load_codec(model_dir)
    os.makedirs(output, exist_ok=True)
    for n, path in enumerate(latents.part_paths(dataset, completion.read_manifest(dataset))):
        # The decode job's own file writers, without a runner around them.
        writer = (TFRecordShard(os.path.join(output, f"images-{n:05d}.tfrecord")) if output_format == "tfrecord"
                  else PngFiles(output))
        for rb in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for batch in codec.decompress(rb):
                writer.write(batch)
        writer.close()


def file_creation(folder: str, n: str = "20000", deleted: str = "60000") -> None:
    """Microseconds to create a small file: in a new folder, then right after deleting `deleted`
    other files (ext4 scans past recently freed inodes). Run it after a few quiet minutes."""
    payload = bytes(550)  # about one decoded MNIST PNG

    def create(sub, count):
        path = os.path.join(folder, sub)
        os.makedirs(path)
        started = time.perf_counter()
        for i in range(count):
            with open(os.path.join(path, f"{i:07d}.png"), "wb") as f:
                f.write(payload)
        elapsed = time.perf_counter() - started
        os.sync()
        return elapsed / count * 1e6

    print(f"create {int(n):,} files in a new folder                    {create('quiet', int(n)):6.1f} us/file")
    create("doomed", int(deleted))
    shutil.rmtree(os.path.join(folder, "doomed"))
    os.sync()
    print(f"create {int(n):,} files just after deleting {int(deleted):,} others    "
          f"{create('after', int(n)):6.1f} us/file")
    shutil.rmtree(folder)


def encode_naive(pattern: str, model_dir: str, output: str) -> None:
    """What a new user writes from Beam's RunInference examples: one image per element."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

    # Written as a user new to the codebase would: Pillow to decode, the SavedModel's `encode`
    # signature loaded with TensorFlow, tf.train.Example to parse; none of latentpack's helpers.
    class SavedModelHandler(ModelHandler):
        def load_model(self):
            import tensorflow as tf
            return tf.saved_model.load(model_dir).signatures["encode"]

        def run_inference(self, batch, model, inference_args=None):
            return list(model(images=np.stack(batch))["latent"].numpy())

    def parse(record):
        import io

        from PIL import Image
        from tensorflow.core.example import example_pb2
        feature = example_pb2.Example.FromString(record).features.feature
        key = feature["image/key"].bytes_list.value[0].decode()
        image = np.array(Image.open(io.BytesIO(feature["image/encoded"].bytes_list.value[0])))
        return key, image[..., None]

    schema = pa.schema([("key", pa.string()), ("latent", pa.list_(pa.int8()))])
    # Default options, as for the `beam` variant (BENCH_NO_PRISM pins the in-process runner for both).
    with beam.Pipeline(argv=["--runner=FnApiRunner"] if os.environ.get("BENCH_NO_PRISM") else []) as p:
        (p | beam.io.ReadFromTFRecord(pattern)
           | beam.Map(parse)
           | RunInference(KeyedModelHandler(SavedModelHandler()))
           | beam.MapTuple(lambda key, latent: {"key": key, "latent": latent.tolist()})
           | beam.io.WriteToParquet(os.path.join(output, "latents"), schema, codec="zstd"))


CHILDREN = {"encode-loop": encode_loop, "decode-loop": decode_loop, "encode-naive": encode_naive,
            "encode-steps": encode_steps, "file-creation": file_creation}
