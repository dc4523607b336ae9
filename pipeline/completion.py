"""The completion protocol shared by every job's output folder.

A job's output is complete only when its marker `_manifest.json` exists, written last
through a temporary name and a rename; a job that fails writes `_failed.json` instead.
A re-run first removes both markers (so the folder never looks complete early), then
only the files that an earlier run of the same job wrote (the patterns its job names),
and Beam's temporary folders. Nothing else in the folder is touched.
"""
from __future__ import annotations

import glob
import json
import posixpath

from apache_beam.io.filesystems import FileSystems

from pipeline.errors import LatentpackError

MANIFEST = "_manifest.json"
FAILED = "_failed.json"
DEAD_LETTER_DIR = "dead_letter"


def write_json(path: str, payload: dict) -> None:
    """Write JSON through a temporary name and a rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with FileSystems.create(tmp) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True).encode())
    FileSystems.rename([tmp], [path])


def read_manifest(folder: str, what: str = "latent dataset") -> dict:
    """The folder's manifest, or a LatentpackError saying the output is incomplete."""
    path = posixpath.join(folder, MANIFEST)
    if not FileSystems.exists(path):
        raise LatentpackError(
            f"{folder} is not a complete {what}: {MANIFEST} is missing "
            f"(the job that writes it did not finish, or this is not a latentpack {what})")
    try:
        with FileSystems.open(path) as f:
            manifest = json.loads(f.read())
    except ValueError as e:
        raise LatentpackError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise LatentpackError(f"{path}: not a latentpack manifest")
    return manifest


def raise_if_failed(output: str) -> None:
    """In the driver, after the job: turn a `_failed.json` into a clear error."""
    path = posixpath.join(output, FAILED)
    if FileSystems.exists(path):
        with FileSystems.open(path) as f:
            failed = json.loads(f.read())
        raise LatentpackError(f"{failed['failure']}. The output is not marked complete; see "
                              f"{posixpath.join(output, DEAD_LETTER_DIR)}/ for each input")


def unmark(output: str) -> None:
    """Delete an earlier run's completion markers first, so a re-run never looks complete early."""
    for marker in (MANIFEST, FAILED):
        path = posixpath.join(output, marker)
        if FileSystems.exists(path):
            FileSystems.delete([path])


def clear_previous(output: str, patterns) -> None:
    """Unmark `output`, then remove an earlier run's files matching `patterns` and the temporary
    folders of a run killed before Beam finalized it. Nothing else in the folder is touched."""
    unmark(output)
    stale = {m.path for pattern in list(patterns) + [f"{DEAD_LETTER_DIR}/part-*.jsonl"]
             for m in FileSystems.match([posixpath.join(output, pattern)])[0].metadata_list}
    temp_dirs = set()
    for folder in (output, posixpath.join(output, DEAD_LETTER_DIR)):
        for m in FileSystems.match([posixpath.join(folder, "beam-temp-*/**")])[0].metadata_list:
            temp_dirs.add(posixpath.join(folder, m.path[len(folder) + 1:].split("/", 1)[0]))
        if "://" not in folder:  # local folders: empty temp directories too
            temp_dirs.update(glob.glob(posixpath.join(folder, "beam-temp-*")))
    if stale or temp_dirs:
        FileSystems.delete(sorted(stale) + sorted(temp_dirs))


def run_to_completion(pipeline, output: str, what: str = "latent dataset") -> dict:
    """Run a job, turn a failure marker into a clear error, and return its manifest."""
    pipeline.run().wait_until_finish()
    raise_if_failed(output)
    return read_manifest(output, what)
