"""The error types every layer shares, and the wrapper that turns them into exit statuses.

`LatentpackError` is a mistake about the whole job (a bad flag, a missing model, an
incomplete dataset): the command line prints it as one `latentpack: error:` line and
exits with status 2. `BadImage` is one input that cannot be used: it becomes a dead
letter with its `reason`, and the job goes on.
"""


import functools
import sys


class LatentpackError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


class BadImage(ValueError):
    """One image that cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def guarded(main):
    """Wrap an entry point so user mistakes print one clear line and exit 2, and an interrupt
    exits 130, never with a traceback."""
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
