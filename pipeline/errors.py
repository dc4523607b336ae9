"""The error types every layer shares, and the wrapper that turns them into exit statuses.

`LatentpackError` is a mistake about the whole job (a bad flag, a missing model, an
incomplete dataset): the command line prints it as one `latentpack: error:` line and
exits with status 2. `BadImage` is one input that cannot be used: it becomes a dead
letter with its `reason`, and the job goes on.
"""


import functools
import logging
import sys

# latentpack's own progress and notes; Beam's and TensorFlow's loggers stay at their levels.
log = logging.getLogger("latentpack")


def show_progress() -> None:
    """Send latentpack's INFO lines (progress, what a job is doing) to stderr, timestamped."""
    if not any(getattr(h, "_latentpack", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._latentpack = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class LatentpackError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""

    exit_code = 2


class BadDataError(LatentpackError):
    """The job ran, but too many of its inputs were bad (or one was fatally so): one line, exit
    status 3, so that schedulers can tell bad data from bad settings (2)."""

    exit_code = 3


class BadImage(ValueError):
    """One image that cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Errors of the machine rather than of the data: no space, quota, read-only or forbidden folder.
_ENVIRONMENT_ERRNOS = {28: "no space left on the device", 122: "disk quota exceeded",
                       30: "read-only file system", 13: "permission denied",
                       20: "a part of the path is a file, not a folder", 21: "a folder is in the way",
                       36: "a file name too long for the file system",
                       27: "the file grew past the size the system allows (a file-size limit, ulimit -f?)",
                       40: "a symbolic link where the job writes a file (never written through)"}


def environment_error(e: BaseException):
    """One line for an OSError of the machine (also when Beam re-raised it from a worker), or None."""
    import re

    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        return _ENVIRONMENT_ERRNOS[e.errno] + (f" writing {e.filename}" if e.filename else "")
    m = re.search(r"(?:^|OSError: )\[Errno (\d+)\] ([^\[\n]*)", str(e))
    if m and int(m.group(1)) in _ENVIRONMENT_ERRNOS:
        path = re.search(r"'([^']+)'", m.group(2))
        return _ENVIRONMENT_ERRNOS[int(m.group(1))] + (f" writing {path.group(1)}" if path else "")
    return None


_REMOTE_HINTS = {
    "gs": "gs:// paths need Beam's GCP extra (pip install 'apache-beam[gcp]') and Google credentials "
          "(gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS)",
    "s3": "s3:// paths need Beam's AWS extra (pip install 'apache-beam[aws]') and AWS credentials "
          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, or --s3_access_key_id and --s3_region_name)",
}


def remote_error(e: BaseException):
    """One line for a cloud storage path the machine cannot use (no client library, no
    credentials, no network, no such bucket), also when Beam wrapped it, or None."""
    import re

    text = f"{type(e).__name__}: {e}"
    chain, cause = [text], e.__cause__ or e.__context__
    while cause is not None and len(chain) < 5:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    text = " / ".join(chain)
    paths = re.findall(r"\b((?:gs|s3|hdfs|azfs)://[^\s'\",}\]]+)", text)
    scheme = paths[0].split("://")[0] if paths else ("gs" if "GcsIO" in text or "GCP" in text else
                                                      "s3" if "boto" in text.lower() or "S3" in text else None)
    if scheme is None and not re.search(r"No filesystem found for scheme", text):
        return None
    unknown = re.search(r"No filesystem found for scheme (\w+)", text)
    if unknown:
        return f"no file system for {unknown.group(1)}:// paths in this installation"
    where = f" ({paths[0]})" if paths else ""
    if re.search(r"dependencies are not installed|No module named|Failed to import|Must provide one of client or options", text):
        return f"cannot use {scheme}:// paths here{where}: " + _REMOTE_HINTS.get(scheme, "its client is not installed")
    if re.search(r"[Cc]redential|NoCredentialsError|Unable to locate credentials|DefaultCredentialsError", text):
        return f"no credentials for {scheme}://{where}: " + _REMOTE_HINTS.get(scheme, "")
    if "BeamIOError" in text or re.search(r"(?i)connection|timed? ?out|resolve|unreachable|NotFound|403|404", text):
        detail = chain[-1].split("\n")[0][:200]
        return f"cannot reach {scheme}://{where}: {detail}"
    return None


def _interrupted() -> int:
    """Report an interrupt; a second one while the interpreter shuts down (joining Beam's and
    TensorFlow's threads) exits at once with the same status, not with a traceback."""
    import os
    import signal
    import threading

    print("latentpack: interrupted", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    return 130


class _Interrupts:
    """Whether a SIGINT arrived during the command. An interrupt is not always a KeyboardInterrupt by
    the time it reaches the entry point: Beam re-raises it from a DoFn as a RuntimeError, and one that
    lands inside TensorFlow's C++ while it handles an error of its own comes out as pybind11's
    "RuntimeError: ... MISMATCH of original and normalized active exception types" (seen when Ctrl-C
    hit a job loading its model). So the handler notes it, then raises as Python's own would."""

    def __init__(self):
        self.seen = False

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        import logging

        self.seen = True
        # Beam and TensorFlow log the exception the interrupt causes (with its traceback) on the way
        # out; after Ctrl-C the one line the user gets is ours.
        logging.disable(logging.CRITICAL)
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        import signal

        # After an interrupt `_interrupted` has put its own handler in place; leave it.
        if self.previous is not None and signal.getsignal(signal.SIGINT) == self._handler:
            signal.signal(signal.SIGINT, self.previous)
        return False


def guarded(main):
    """Wrap an entry point so user mistakes print one clear line and exit 2, and an interrupt
    exits 130, never with a traceback."""
    @functools.wraps(main)
    def run(argv=None):
        with _Interrupts() as interrupts:
            try:
                return main(argv)
            except LatentpackError as e:
                print(f"latentpack: error: {e}", file=sys.stderr)
                return e.exit_code
            except KeyboardInterrupt:
                return _interrupted()
            except Exception as e:
                if interrupts.seen or str(e).startswith("KeyboardInterrupt"):  # re-raised by Beam or TF
                    return _interrupted()
                line = environment_error(e)
                if line is not None:
                    line += "; the output is not marked complete"
                else:
                    line = remote_error(e)
                if line is None:
                    raise
                print(f"latentpack: error: {line}", file=sys.stderr)
                return 2
    return run
