"""A script's own output folder, started afresh without deleting anything it did not write."""
import os
import shutil


def start_afresh(out: str, own: set, what: str) -> None:
    """Remove `out` if it holds only entries named in `own` (an earlier run's output), then create
    it; a folder with anything else in it (a user's files: `--out ~/data` by mistake) stops the
    script with one line, nothing deleted."""
    if os.path.lexists(out):
        if os.path.islink(out) or not os.path.isdir(out):
            raise SystemExit(f"{what}: --out {out} exists and is not a folder")
        foreign = sorted(set(os.listdir(out)) - own)
        if foreign:
            raise SystemExit(f"{what}: --out {out} holds {', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}, "
                             "which an earlier run did not write; choose a new or empty folder, nothing was deleted")
        shutil.rmtree(out)
    os.makedirs(out)
