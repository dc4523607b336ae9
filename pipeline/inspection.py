"""Look at a latent dataset: manifest, schema, model, counts, bytes per image, and pictures.

    latentpack inspect latents/
    latentpack inspect latents/ --model-dir model/ --samples 16 --picture grid.png \
        --source 'shards/*.tfrecord' --source-format tfrecord
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import latents
from pipeline.formats import READERS, get_reader
from pipeline.completion import read_manifest
from pipeline.errors import LatentpackError
from pipeline.images import ImageBatch, batch_records, psnr


def parse_args(argv):
    p = argparse.ArgumentParser(prog="latentpack inspect", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", help="latent dataset directory")
    p.add_argument("--model-dir", help="the model artifact, to decode samples and measure quality (default: the "
                                       "shipped model that made the dataset, if it is one)")
    p.add_argument("--samples", type=int, default=0, help="rows to decode (needs --model-dir)")
    p.add_argument("--picture", help="write an original-vs-reconstruction grid of the samples here (PNG)")
    p.add_argument("--source", help="glob of the original images, to compare against")
    p.add_argument("--source-format", default="tfrecord", choices=sorted(READERS), help="format of --source")
    p.add_argument("--allow-incomplete", action="store_true", help="inspect a dataset without a manifest")
    return p.parse_args(argv)


def sample_rows(paths: list, n: int):
    """The first n rows of the dataset, as one Arrow table."""
    tables, have = [], 0
    for path in paths:
        with FileSystems.open(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=max(n, 1)):
                tables.append(rb.slice(0, n - have))
                have += min(rb.num_rows, n - have)
                if have >= n:
                    break
        if have >= n:
            break
    import pyarrow as pa
    return pa.Table.from_batches(tables)


def source_images(pattern: str, fmt: str, keys: list, shape) -> dict:
    wanted, found = set(keys), {}
    reader = get_reader(fmt)
    shards, root = reader.match(pattern)
    for shard in shards:
        for item in batch_records(reader.records(shard, root), shape, 1024):
            if isinstance(item, ImageBatch):
                for key, image in zip(item.keys, item.images):
                    if key in wanted:
                        found[key] = image
            if len(found) == len(wanted):
                return found
    return found


def grid(rows: list, path: str, scale: int = 3, cell: int = 192) -> None:
    """Rows of uint8 images -> one PNG, 2-pixel gaps. Images of several sizes (photos) are
    shown as thumbnails of at most `cell` pixels a side, unscaled otherwise."""
    from PIL import Image

    shapes = {image.shape for row in rows for image in row}
    if len(shapes) > 1 or max(max(s[:2]) for s in shapes) > cell:
        c = max(s[2] for s in shapes)
        thumbs = []
        for row in rows:
            out = []
            for image in row:
                img = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).convert("L" if c == 1 else "RGB")
                img.thumbnail((cell, cell))
                tile = np.full((cell, cell, c), 255, np.uint8)
                arr = np.asarray(img).reshape(img.height, img.width, c)
                tile[:img.height, :img.width] = arr
                out.append(tile)
            thumbs.append(out)
        rows, scale = thumbs, 1
    h, w, c = rows[0][0].shape
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + 2), cols * (w + 2), c), 255, np.uint8)
    for r, images in enumerate(rows):
        for i, image in enumerate(images):
            canvas[r * (h + 2):r * (h + 2) + h, i * (w + 2):i * (w + 2) + w] = image
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def byte_split(paths) -> dict:
    """Where a dataset's bytes go, from its parts' footers alone: each column's compressed bytes
    (the values and their page headers) and the footers themselves."""
    out = {}
    for path in paths:
        with FileSystems.open(path) as f:
            meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                out[column.path_in_schema] = out.get(column.path_in_schema, 0) + column.total_compressed_size
        out["footer"] = out.get("footer", 0) + meta.serialized_size
    return out


def check_picture(path: str) -> None:
    """--picture must be a new or existing file in an existing folder: checked before any decoding."""
    import os

    from pipeline.errors import LatentpackError

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise LatentpackError(f"--picture {path} is a folder; give the PNG file to write")
    if not os.path.isdir(parent):
        raise LatentpackError(f"--picture {path}: the folder {parent} does not exist")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.picture:
        check_picture(args.picture)
    dataset = args.dataset.rstrip("/")
    if args.allow_incomplete and not FileSystems.exists(f"{dataset}/{latents.MANIFEST}"):
        paths = sorted(m.path for m in FileSystems.match([f"{dataset}/{latents.PART_PREFIX}-*.parquet"])[0].metadata_list)
        manifest = {"complete": False, "files": [{"name": p.rsplit("/", 1)[1]} for p in paths]}
    else:
        manifest = read_manifest(dataset)
        paths = latents.part_paths(dataset, manifest)
        # Sizes and rows always; checksums too when it decodes rows.
        latents.require_intact(dataset, paths, manifest["files"], checksums=bool(args.samples))
    if not paths:
        raise LatentpackError(f"{dataset}: no Parquet parts")
    with FileSystems.open(paths[0]) as f:
        schema = pq.read_schema(f)
    meta = latents.metadata_of(schema)
    images = manifest.get("images", 0)
    print(f"dataset      {dataset} ({'complete' if manifest.get('complete') else 'INCOMPLETE'})")
    import families

    shape = families.family(meta.get("family", "dense")).describe(meta)
    print(f"model        {meta['model_fingerprint']} ({meta.get('arch')}, {shape})"
          + (f", encoded with --refine {manifest['refine']}" if manifest.get("refine") else ""))
    if images:
        print(f"images       {images:,} in {len(paths)} part(s), {manifest['total_bytes']:,} bytes, "
              f"{manifest['total_bytes'] / images:.1f} bytes per image")
        print("bytes/image  " + ", ".join(f"{name} {size / images:.2f}" for name, size in byte_split(paths).items()))
    if "counts" in manifest:
        print(f"counts       {json.dumps(manifest['counts'], sort_keys=True)}")
    print("schema")
    for field in schema:
        print(f"  {field.name:<8} {field.type}")
    if args.samples:
        from pipeline import models
        from pipeline.codec import codec_class, load_codec
        from pipeline.images import DeadLetter
        found = models.find(meta["model_fingerprint"])
        model_dir = args.model_dir or models.embedded(args.dataset.rstrip("/")) or (found and found[1])
        if not model_dir:
            raise LatentpackError(f"--samples needs --model-dir to decode (the dataset's model "
                                  f"{meta['model_fingerprint']} is not a shipped one)")
        codec = load_codec(models.resolve(model_dir))
        if codec.fingerprint != meta["model_fingerprint"]:
            raise LatentpackError(f"--model-dir {codec.fingerprint} did not make this dataset "
                                  f"({meta['model_fingerprint']})")
        rows = sample_rows(paths, args.samples)
        decoded, bad = {}, []
        for item in codec.decompress(rows):
            if isinstance(item, DeadLetter):
                bad.append(f"{item.key} ({item.reason})")
            else:
                decoded.update(zip(item.keys, item.images))
        if bad:
            print(f"undecodable  {len(bad)}: {', '.join(bad[:8])}")
        keys = [k for k in rows.column("key").to_pylist() if k in decoded]
        recon = [decoded[k] for k in keys]
        picture_rows = [recon]
        print(f"samples      {len(keys)}: {', '.join(keys[:8])}{' …' if len(keys) > 8 else ''}")
        if args.source:
            originals = source_images(args.source, args.source_format, keys, codec_class(codec.spec).image_shape(codec.spec))
            have = [i for i, k in enumerate(keys) if k in originals]
            if not have:
                raise LatentpackError(f"none of the sampled keys were found in --source {args.source!r}")
            scores = np.array([psnr(originals[keys[i]][None], recon[i][None])[0] for i in have])
            print(f"quality      PSNR mean {scores.mean():.2f} dB, worst {scores.min():.2f} dB "
                  f"on {len(have)} sampled images")
            picture_rows = [[originals[keys[i]] for i in have], [recon[i] for i in have]]
        if args.picture:
            grid(picture_rows, args.picture)
            print(f"picture      {args.picture}")
    return 0


if __name__ == "__main__":
    from pipeline.errors import guarded
    sys.exit(guarded(main)())
