"""The `latentpack` command: one subcommand per job, each also runnable as a module.

    latentpack train  ...   (training.train)
    latentpack encode ...   (pipeline.encode)
    latentpack decode ...   (pipeline.decode)
    latentpack inspect ...  (pipeline.inspection)
    latentpack evaluate ... (pipeline.evaluate)

Subcommands are imported by name only when asked for, so the Beam jobs never
import `training/`.
"""
from __future__ import annotations

import functools
import importlib
import sys

from pipeline.errors import LatentpackError

COMMANDS = {
    "train": ("training.train", "train an autoencoder and export a model artifact"),
    "encode": ("pipeline.encode", "encode image shards into a latent Parquet dataset (Beam job)"),
    "decode": ("pipeline.decode", "decode a latent dataset back into images (Beam job)"),
    "inspect": ("pipeline.inspection", "summarize a latent dataset; decode samples into a picture"),
    "evaluate": ("pipeline.evaluate", "rate-distortion of models against PNG, JPEG and WebP on the same images"),
}


def guarded(main):
    """Wrap an entry point so user mistakes print one clear line and exit 2, not a traceback."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except LatentpackError as e:
            print(f"latentpack: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("latentpack: interrupted", file=sys.stderr)
            return 130
    return run


def usage() -> str:
    lines = ["usage: latentpack COMMAND [options]   (latentpack COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"latentpack: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return guarded(module.main)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
