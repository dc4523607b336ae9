"""The completion protocol shared by every job's output folder.

A job's output is complete only when its marker `_manifest.json` exists, written last
through a temporary name and a rename (and sealed with a checksum of its own content); a
job that fails writes `_failed.json` instead. While it runs, a job holds `_lock.json`
(job, host, pid, start time): a second job on the same folder is refused, and a lock
left by a killed job is recognised as stale (its process is gone) and taken over.

A job writes only into a folder that is empty or that an earlier run of the same job
wrote (its manifest, failed marker or stale lock is there): files it did not write are
never overwritten or deleted. A re-run first removes the markers (so the folder never
looks complete early), then the files matching the patterns its job names, and Beam's
temporary folders.
"""
from __future__ import annotations

import glob
import json
import os
import posixpath
import socket
import time
from typing import Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.errors import LatentpackError
from pipeline.errors import log

MANIFEST = "_manifest.json"
FAILED = "_failed.json"
LOCK = "_lock.json"
DEAD_LETTER_DIR = "dead_letter"
# What a job leaves in its folder besides the files its patterns name.
# The decode job's probe of how its output's filesystem compares file names (`outputs.name_identity`):
# a name in lower case ending in an accented letter (one code point), created and removed at once.
NAME_PROBE = ".latentpack-name-probe-\u00e9"
_OURS = (MANIFEST, FAILED, LOCK, DEAD_LETTER_DIR, NAME_PROBE, "_model")


SEAL = "manifest_sha256"


def same_place(path: str) -> str:
    """A path as one spelling per place: local paths absolute with links, `.` and `..` resolved
    (`lat`, `./lat`, `/work/lat` and a link to it are one folder); a remote URL (gs://, s3://) with
    its path normalized."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)


def is_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it, however either is spelled."""
    path, folder = same_place(path), same_place(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def create_file(path: str):
    """A file opened for writing as Beam's FileSystems.create does, but locally never through a
    symbolic link (O_NOFOLLOW: a link planted where the job writes fails with ELOOP, one error line)."""
    if "://" in path:
        return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666), "wb")


def seal(manifest: dict) -> dict:
    """The manifest with a SHA-256 of its own canonical JSON (without this field), so that an
    edited manifest is noticed."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != SEAL}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return dict(body, **{SEAL: digest})


def commit(tmp: str, path: str) -> None:
    """Put a finished temporary file at `path`, replacing what is there (an earlier run's file,
    or the same file from a retried task): readers see the old file or the new one, never half."""
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def write_bytes(path: str, data: bytes) -> None:
    """A whole file, written under `<path>.tmp` and committed."""
    tmp = path + ".tmp"
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    commit(tmp, path)


def write_json(path: str, payload: dict) -> None:
    write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode())


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
    if SEAL in manifest and seal(manifest)[SEAL] != manifest[SEAL]:
        raise LatentpackError(f"{path}: the manifest was modified after the job wrote it (its {SEAL} does not "
                              "match its content)")
    return manifest


def raise_if_failed(output: str) -> None:
    """In the driver, after the job: turn a `_failed.json` into a clear error."""
    path = posixpath.join(output, FAILED)
    if FileSystems.exists(path):
        with FileSystems.open(path) as f:
            failed = json.loads(f.read())
        from pipeline.errors import BadDataError

        kept = failed.get("kept_manifest")
        state = ("The dataset is as the last successful run sealed it (its manifest is kept); this run's dead "
                 "letters are in" if kept else "The output is not marked complete; see")
        raise BadDataError(f"{failed['failure']}. {state} {posixpath.join(output, DEAD_LETTER_DIR)}/ for each input")


def unmark(output: str, keep_manifest: bool = False) -> None:
    """Delete an earlier run's completion markers first, so a re-run never looks complete early
    (an incremental run keeps the manifest: the dataset it seals stays usable while new parts are
    added, and after a run that fails)."""
    for marker in ((FAILED,) if keep_manifest else (MANIFEST, FAILED)):
        path = posixpath.join(output, marker)
        if FileSystems.exists(path):
            FileSystems.delete([path])


def stored_json(path: str):
    """The JSON object stored at `path`, or None (missing, unreadable, or not an object)."""
    try:
        with FileSystems.open(path) as f:
            value = json.loads(f.read())
        return value if isinstance(value, dict) else None
    except Exception:
        return None


def _alive(lock: dict) -> bool:
    """Whether the process that holds a lock may still run (unknown on another host: assume so)."""
    if lock.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(lock.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


class OutputFolder:
    """One job's claim on its output folder: `claim()` before the pipeline runs, `release()` after."""

    def __init__(self, output: str, job: str):
        self.output, self.job = output.rstrip("/"), job
        self.lock_path = posixpath.join(self.output, LOCK)
        self.held = False

    def _previous_run_of_this_job(self) -> bool:
        for marker in (MANIFEST, FAILED):
            found = stored_json(posixpath.join(self.output, marker))
            if found is not None and found.get("job", self._format_job(found)) == self.job:
                return True
        return False

    @staticmethod
    def _format_job(marker: dict):
        # Markers written before `job` was recorded: tell the job by the manifest's format.
        return {"latentpack-dataset": "encode", "latentpack-decoded": "decode"}.get(marker.get("format"))

    def _symbolic_link(self) -> Optional[str]:
        """The first symbolic link anywhere in a local output folder (links are never followed)."""
        if "://" in self.output:
            return None
        for folder, dirs, files in os.walk(self.output):
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    return path
        return None

    def _foreign_entries(self) -> list:
        """Entries of the folder that no latentpack job of this kind wrote (first few only)."""
        if "://" in self.output:
            found = FileSystems.match([posixpath.join(self.output, "*")])[0].metadata_list
            names = [m.path[len(self.output) + 1:] for m in found]
        else:
            names = []
            with os.scandir(self.output) as entries:
                for entry in entries:
                    names.append(entry.name)
                    if len(names) > 1000:
                        break
        return [n for n in names if n not in _OURS and not n.startswith("beam-temp-")][:5]

    def claim(self) -> None:
        """Refuse a folder that is a file, another job's, or holds files no run of this job wrote;
        then take the lock."""
        if "://" not in self.output and os.path.exists(self.output) and not os.path.isdir(self.output):
            raise LatentpackError(f"--output {self.output} exists and is not a folder")
        if not FileSystems.exists(self.output):
            FileSystems.mkdirs(self.output)
        lock = stored_json(self.lock_path) if FileSystems.exists(self.lock_path) else None
        stale = False
        if lock is not None:
            if _alive(lock):
                raise LatentpackError(
                    f"another latentpack {lock.get('job')} job is writing {self.output} (pid {lock.get('pid')} on "
                    f"{lock.get('host')}, since {lock.get('started')}); if it is no longer running, delete "
                    f"{self.lock_path}")
            stale = lock.get("job") == self.job
            log.warning("found a stale lock in %s (pid %s on %s, since %s, no longer running); taking over",
                            self.output, lock.get("pid"), lock.get("host"), lock.get("started"))
        link = self._symbolic_link()
        if link is not None:
            raise LatentpackError(
                f"--output {self.output} holds a symbolic link, {link} -> {os.readlink(link)}; a job writes only "
                "real files in its output (a re-run would write through the link, to a file outside it): remove it")
        if not stale and not self._previous_run_of_this_job():
            foreign = self._foreign_entries()
            if foreign:
                raise LatentpackError(
                    f"--output {self.output} is not empty and was not written by an earlier latentpack {self.job} "
                    f"(it holds {', '.join(foreign)}…); choose an empty or new folder, so that no file of yours "
                    "is overwritten or deleted")
        write_json(self.lock_path, {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.held = True

    def release(self) -> None:
        if self.held and FileSystems.exists(self.lock_path):
            FileSystems.delete([self.lock_path])
        self.held = False


def previous_marker(output: str, job: str) -> Optional[dict]:
    """The manifest or failure marker an earlier run of `job` left in `output`, or None."""
    for marker in (MANIFEST, FAILED):
        found = stored_json(posixpath.join(output, marker))
        if found is not None and found.get("job", OutputFolder._format_job(found)) == job:
            return found
    return None


def recorded_files(output: str, marker: Optional[dict]) -> list:
    """The files an earlier run's marker says it wrote (its `files` and `dead_letter_files`, plain
    names inside `output` only): what a re-run may delete, and nothing else."""
    out = []
    for name in (marker or {}).get("files", []) + (marker or {}).get("dead_letter_files", []):
        if isinstance(name, str) and name and not name.startswith("/") and ".." not in name.split("/") \
                and "\\" not in name:
            out.append(posixpath.join(output, name))
    return out


def clear_previous(output: str, patterns, owned=None, keep_manifest: bool = False) -> None:
    """Unmark `output`, then remove an earlier run's files matching `patterns` and the temporary
    folders of a run killed before Beam finalized it. Nothing else in the folder is touched.
    With `owned` (the files an earlier run's marker lists), only those of them that match
    `patterns` are removed: a file of the user's that merely looks like ours stays."""
    unmark(output, keep_manifest)
    stale = {m.path for pattern in list(patterns) + [f"{DEAD_LETTER_DIR}/part-*.jsonl"]
             for m in FileSystems.match([posixpath.join(output, pattern)])[0].metadata_list}
    if owned is not None:
        stale &= set(owned)
    temp_dirs = set()
    for folder in (output, posixpath.join(output, DEAD_LETTER_DIR)):
        for m in FileSystems.match([posixpath.join(folder, "beam-temp-*/**")])[0].metadata_list:
            temp_dirs.add(posixpath.join(folder, m.path[len(folder) + 1:].split("/", 1)[0]))
        if "://" not in folder:  # local folders: empty temp directories too
            temp_dirs.update(glob.glob(posixpath.join(folder, "beam-temp-*")))
    if stale or temp_dirs:
        FileSystems.delete(sorted(stale) + sorted(temp_dirs))


def run_to_completion(pipeline, output: str, what: str = "latent dataset", claim: "OutputFolder" = None) -> dict:
    """Run a job, turn a failure marker into a clear error, and return its manifest; the folder's
    lock is released however the job ends (an interrupted job leaves its output unmarked)."""
    result = None
    try:
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        # The Dask runner leaves its connection to the cluster open; a scheduled job must not.
        client = getattr(result, "client", None)
        if client is not None:
            client.close()
        if claim is not None:
            claim.release()
    raise_if_failed(output)
    return read_manifest(output, what)
