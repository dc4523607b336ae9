"""Check a latent dataset (and optionally its model) without decoding: for scheduled integrity checks.

    latentpack verify latents/ [--model-dir model/]

Checks the manifest's own seal, that every part it lists is a plain file in the folder
with the recorded bytes, rows and CRC32C, that every part names the manifest's model,
that the counts add up, and that the dead-letter files are there; with --model-dir, that
the artifact matches its own fingerprint and is the model that made the dataset. Prints
one line per problem; exits 0 when there is none, 2 otherwise.
"""
from __future__ import annotations

import argparse
import posixpath
import sys

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import latents
from pipeline.completion import SEAL, read_manifest
from pipeline.errors import LatentpackError, guarded


def problems(dataset: str, model_dir: str = None) -> tuple:
    """(problems, facts): what is wrong with the dataset, and what was checked."""
    found = []
    manifest = read_manifest(dataset)  # refuses a missing, unreadable or edited manifest
    if manifest.get("format") != "latentpack-dataset":
        raise LatentpackError(f"{dataset}: {latents.MANIFEST} is not a latentpack dataset manifest")
    if SEAL not in manifest:
        found.append(f"{latents.MANIFEST} has no {SEAL} (written before checksums were recorded): only sizes "
                     "and rows can be checked")
    found.extend(latents.inconsistencies(manifest))
    paths = latents.part_paths(dataset, manifest)
    for path in latents.unlisted_parts(dataset, manifest):
        found.append(f"{path} is not listed in the manifest (added to the dataset by hand, or by another job): "
                     "nothing reads it")
    rows = 0
    for path, expected in zip(paths, manifest["files"]):
        problem = latents.check_part(path, expected)
        if problem:
            found.append(f"{path} {problem}")
            continue
        if "crc32c" not in expected:
            found.append(f"{path}: the manifest records no checksum for it")
        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            rows += pf.metadata.num_rows
            try:
                meta = latents.metadata_of(pf.schema_arrow)
            except LatentpackError as e:
                found.append(f"{path}: {e}")
                continue
        if meta.get("model_fingerprint") != manifest.get("model_fingerprint"):
            found.append(f"{path} was made by model {meta.get('model_fingerprint')}, the manifest says "
                         f"{manifest.get('model_fingerprint')}")
    if not found and rows != manifest.get("images"):
        found.append(f"the parts hold {rows} rows, the manifest says {manifest.get('images')} images")
    c = manifest.get("counts", {})
    if c and c.get("read") != c.get("written", 0) + c.get("dead_lettered", 0):
        found.append(f"counts do not add up: read {c.get('read')} != written {c.get('written')} + dead-lettered "
                     f"{c.get('dead_lettered')}")
    for name in manifest.get("dead_letter_files", []):
        if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/") or \
                not FileSystems.exists(posixpath.join(dataset, name)):
            found.append(f"dead-letter file {str(name)[:80]!r} is missing or outside the dataset")
    if manifest.get("embedded_model"):
        from pipeline import models
        from pipeline.artifact import read_spec

        inside = models.embedded(dataset)
        try:
            if inside is None:
                raise LatentpackError(f"the manifest records an embedded model, and {dataset}/_model has none")
            if read_spec(inside).fingerprint != manifest.get("model_fingerprint"):
                found.append(f"{inside} is not the model that made this dataset")
        except LatentpackError as e:
            found.append(f"embedded model: {e}")
    if model_dir:
        from pipeline.artifact import read_spec
        from pipeline.decode import model_for

        try:  # a shipped name that an earlier release gave the dataset's model means that (retired) model
            spec = read_spec(model_for(dataset, manifest, model_dir))
        except LatentpackError as e:
            found.append(f"model: {e}")
        else:
            if spec.fingerprint != manifest.get("model_fingerprint"):
                found.append(f"--model-dir {spec.fingerprint} did not make this dataset "
                             f"({manifest.get('model_fingerprint')})")
    return found, {"parts": len(paths), "images": manifest.get("images")}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="latentpack verify", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", help="latent dataset directory")
    p.add_argument("--model-dir", help="also check this model artifact (or photo:<q>) and that it made the dataset")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset = args.dataset.rstrip("/")
    found, facts = problems(dataset, args.model_dir)
    for line in found:
        print(f"problem: {line}")
    if found:
        raise LatentpackError(f"{dataset}: {len(found)} problem(s) found")
    print(f"ok: {dataset}: {facts['parts']} part(s), {facts['images']} images, sizes, rows and checksums match "
          "the sealed manifest" + (", made by --model-dir" if args.model_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main)())
