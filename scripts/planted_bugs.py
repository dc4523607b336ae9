"""Plant known bugs one at a time in a copy of the code and check that the suite catches each.

    python scripts/planted_bugs.py [--out planted.md] [BUG ...]        # `make planted`, outside CI

Each bug below is a plausible mistake that once passed every test (issue 34), written as a text
replacement in one or more files. For each, the tracked files are copied to a temporary folder,
the bug is planted there, and the tests that should catch it run against the copy. A bug that no
test catches fails the run. The results table goes to --out (docs/testing.md records it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (what goes wrong, [(file, exact text, replacement)], tests to run)
BUGS = {
    "exif-upside-down": (
        "photos turned upside down after their EXIF orientation is applied",
        [("pipeline/images.py", "img = ImageOps.exif_transpose(img)",
          "img = ImageOps.exif_transpose(img).transpose(Image.Transpose.ROTATE_180)")],
        ["tests/test_golden.py", "tests/test_spatial.py"]),
    "key-mangled": (
        "a key that is not valid UTF-8 mangled with U+FFFD instead of the dead letter bad_key",
        [("pipeline/formats.py", 'value = bytes(value).decode("utf-8")',
          'value = bytes(value).decode("utf-8", "replace")'),
         ("pipeline/tfrecord.py", 'key = values[0].decode("utf-8")', 'key = values[0].decode("utf-8", "replace")')],
        ["tests/test_formats.py", "tests/test_tfrecord.py", "tests/test_faults.py"]),
    "icc-dropped": (
        "a row whose colour profile does not describe its pixels decoded without it instead of bad_row",
        [("families/spatial/codec.py",
          'yield DeadLetter(keys[i], "", i, "bad_row", f"the row\'s colour profile does not describe {c}-channel "\n'
          '                                                            "pixels")\n                continue',
          "profiles[i] = None")],
        ["tests/test_spatial.py", "tests/test_decode.py", "tests/test_faults.py"]),
    "bad-code-swallowed": (
        "an entropy code that does not decode swallowed (decoded as zeros) instead of bad_code",
        [("families/spatial/codec.py",
          'yield DeadLetter(keys[i], "", i, "bad_code", f"latents do not decode: {type(e).__name__}: {e}")\n'
          '                continue',
          "latent = np.zeros(grid + (self.spec.latent_channels,), np.int64)"),
         ("families/dense/codec.py", 'ok[i], why[i] = False, ("bad_code", f"entropy code does not decode: {e}")',
          "latent[i] = 0")],
        ["tests/test_spatial.py", "tests/test_decode.py", "tests/test_faults.py"]),
    "bad-latent-clipped": (
        "a latent out of the quantizer's range clipped instead of bad_latent",
        [("families/spatial/codec.py",
          'yield DeadLetter(keys[i], "", i, "bad_latent", "latent values outside the model\'s tables")\n'
          '                        continue',
          "latent = np.clip(latent, -1, 1)"),
         ("families/dense/codec.py", 'ok[i], why[i] = False, ("bad_latent", "latent values outside the model\'s '
          'quantizer range")', "latent[i] = np.clip(latent[i], self.low, self.high)")],
        ["tests/test_spatial.py", "tests/test_decode.py", "tests/test_faults.py"]),
}


def tracked_copy(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in files:
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


def plant(dest: str, edits) -> None:
    for path, old, new in edits:
        full = os.path.join(dest, path)
        text = open(full).read()
        if text.count(old) != 1:
            sys.exit(f"planted_bugs: {path} holds {text.count(old)} copies of the text to replace; update BUGS")
        open(full, "w").write(text.replace(old, new))


def run(name: str) -> dict:
    what, edits, tests = BUGS[name]
    tests = [t for t in tests if os.path.exists(os.path.join(ROOT, t))]
    with tempfile.TemporaryDirectory(prefix=f"planted-{name}-") as dest:
        tracked_copy(dest)
        plant(dest, edits)
        started = time.time()
        env = dict(os.environ, PYTHONPATH=dest)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                               "addopts=", *tests], cwd=dest, env=env, capture_output=True, text=True)
        failed = sorted({line.split(" ")[1].split(" - ")[0] for line in proc.stdout.splitlines()
                         if line.startswith("FAILED ") or line.startswith("ERROR ")})
    result = {"bug": name, "what": what, "tests": tests, "caught": proc.returncode != 0 and bool(failed),
              "failed": failed, "seconds": round(time.time() - started)}
    print(f"planted_bugs: {name}: " + (f"caught by {len(failed)} test(s), e.g. {failed[0]}" if result["caught"]
                                       else "NOT CAUGHT") + f" ({result['seconds']} s)", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bugs", nargs="*", help=f"which (default all: {', '.join(BUGS)})")
    p.add_argument("--out", default="planted.md")
    args = p.parse_args(argv)
    unknown = set(args.bugs) - set(BUGS)
    if unknown:
        sys.exit(f"planted_bugs: unknown bug(s) {sorted(unknown)}; known: {', '.join(BUGS)}")
    results = [run(name) for name in (args.bugs or BUGS)]
    lines = ["| planted bug | caught | failing tests (of the files run) |", "|---|---|---|"]
    for r in results:
        shown = ", ".join(f"`{t}`" for t in r["failed"][:4]) + (f" and {len(r['failed']) - 4} more" if len(r["failed"]) > 4 else "")
        lines.append(f"| {r['what']} | {'yes' if r['caught'] else '**no**'} | {shown} |")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
