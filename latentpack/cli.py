"""The `latentpack` command: one subcommand per job, each also runnable as a module.

    latentpack train  ...   (training.train)
    latentpack encode ...   (pipeline.encode)
    latentpack decode ...   (pipeline.decode)
    latentpack inspect ...  (pipeline.inspection)
    latentpack verify ...   (pipeline.verify)
    latentpack evaluate ... (pipeline.evaluate)

This package sits above `training/` and `pipeline/`: neither imports it. Subcommands are
imported by name only when asked for, so a Beam job never loads `training/`, and each
job's options are parsed here, at the edge, by its own `parse_args`.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys

from pipeline.errors import guarded

COMMANDS = {
    "train": ("training.train", "train an autoencoder and export a model artifact"),
    "encode": ("pipeline.encode", "encode image shards into a latent Parquet dataset (Beam job)"),
    "decode": ("pipeline.decode", "decode a latent dataset back into images (Beam job)"),
    "inspect": ("pipeline.inspection", "summarize a latent dataset; decode samples into a picture"),
    "verify": ("pipeline.verify", "check a latent dataset's parts against its sealed manifest, without decoding"),
    "evaluate": ("pipeline.evaluate", "rate-distortion of models against PNG, JPEG and WebP on the same images"),
}


def version() -> str:
    """The installed package's version (setup.py's)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("latentpack")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: latentpack COMMAND [options] [--verbose]   (latentpack COMMAND --help for its options)",
             "       latentpack --version", "",
             "  --verbose  also show TensorFlow's and Beam's own start-up logs", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# Lines TensorFlow's native code prints on every start on a machine without a GPU: informational
# (I/W), the CUDA probe's failure (E ... cuInit / cuda), and absl's note about its own start.
_NATIVE_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} |"
                           rb"E\d{4} .*(cuda|cuInit|CUDA|oneDNN supports DT_HALF))")


def quiet_native_logs() -> None:
    """Keep TensorFlow's native start-up chatter off the terminal (`--verbose` shows it).

    fd 2 becomes a pipe read by a thread that forwards every line except the known noise,
    so real native errors still reach the terminal; Python's own stderr (our messages,
    logging, tracebacks) keeps writing to the terminal directly.
    """
    import os
    import threading

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        real = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except OSError:
        return
    sys.stderr.flush()
    sys.stderr = open(os.dup(real), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                      errors="backslashreplace")

    def forward():
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not _NATIVE_NOISE.match(line):
                    os.write(real, line)

    threading.Thread(target=forward, name="latentpack-stderr", daemon=True).start()


@contextlib.contextmanager
def quiet_python_warnings():
    """Beam warns at import about optional cloud client libraries; not the user's concern."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if argv and argv[0] in ("--version", "-V"):
        print(f"latentpack {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"latentpack: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if verbose:
        module = importlib.import_module(COMMANDS[command][0])
    else:
        with quiet_python_warnings():
            module = importlib.import_module(COMMANDS[command][0])
    return guarded(module.main)(rest) or 0


def console() -> int:
    """The `latentpack` executable: `main`, with TensorFlow's native start-up logs filtered, and
    Beam's own report of a failing step (a traceback logged before it re-raises) left to the one
    error line or traceback that follows it."""
    if "--verbose" not in sys.argv:
        quiet_native_logs()
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    return main()


if __name__ == "__main__":
    sys.exit(console())
