"""Every image accounted for: dead-letter output, counts, progress, and the manifest step.

Shared by the encode and decode jobs. The manifest is written by a step whose side
inputs are the written files, so it runs only after every part is finalized.
"""
from __future__ import annotations

import json
import posixpath
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.completion import DEAD_LETTER_DIR, FAILED, MANIFEST, seal, write_json
from pipeline.images import DeadLetter
from pipeline.errors import log

DEAD_LETTER_TAG = "dead_letter"
DEFAULT_MAX_BAD_FRACTION = 0.01


class Progress:
    """Logs images done and images per second at a steady interval (per worker)."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s = what, every_s
        self.done, self.started, self.last = 0, None, 0.0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = self.last = now
        self.done += n
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info("%s %d images (%.0f images/s)", self.what, self.done, rate)


class CountDeadLetters(beam.DoFn):
    """Passes dead letters through, counting them by reason in Beam metrics."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def process(self, letter: DeadLetter):
        Metrics.counter(self.namespace, "dead_lettered").inc()
        Metrics.counter(self.namespace, f"dead_lettered_{letter.reason}").inc()
        yield letter


class WriteDeadLetters(beam.PTransform):
    """Dead letters -> `<output>/dead_letter/part-*.jsonl`; returns {reason: count} as one element."""

    def __init__(self, output: str, namespace: str):
        super().__init__()
        self.output, self.namespace = output, namespace

    def expand(self, letters):
        counted = letters | "CountByReason" >> beam.ParDo(CountDeadLetters(self.namespace))
        written = (counted
                   | "ToJson" >> beam.Map(lambda d: json.dumps(d.to_dict(), sort_keys=True))
                   | "WriteJsonl" >> beam.io.WriteToText(
                       posixpath.join(self.output, DEAD_LETTER_DIR, "part"), file_name_suffix=".jsonl"))
        reasons = (counted
                   | "Reason" >> beam.Map(lambda d: d.reason)
                   | "PerReason" >> beam.combiners.Count.PerElement()
                   | "AsDict" >> beam.combiners.ToDict())
        return reasons, written


def counts(read_written: int, reasons: dict) -> dict:
    """Manifest counts; `read = written + dead_lettered` holds by construction."""
    dead = sum(reasons.values())
    return {"read": read_written + dead, "written": read_written, "dead_lettered": dead,
            "dead_lettered_by_reason": dict(sorted(reasons.items()))}


def finish(output: str, payload: dict, max_bad_fraction: float, fatal_reasons=()) -> None:
    """Write `_manifest.json`, or `_failed.json` instead when too many inputs were bad or any
    dead letter has one of `fatal_reasons`."""
    c = payload["counts"]
    failure = None
    fatal = {r: n for r, n in c["dead_lettered_by_reason"].items() if r in fatal_reasons}
    if fatal:
        failure = f"dead letters that fail the job: {fatal}"
    elif c["read"] and c["dead_lettered"] / c["read"] > max_bad_fraction:
        failure = (f"{c['dead_lettered']} of {c['read']} inputs ({c['dead_lettered'] / c['read']:.1%}) could not "
                   f"be used, more than --max-bad-fraction {max_bad_fraction}; "
                   f"reasons: {c['dead_lettered_by_reason']}")
    if failure:
        write_json(posixpath.join(output, FAILED), dict(payload, complete=False, failure=failure))
    else:
        write_json(posixpath.join(output, MANIFEST), seal(payload))


def summary(manifest: dict, done: str) -> str:
    """One line for the end of a job: what was done and what was dead-lettered, by reason."""
    c = manifest["counts"]
    return (f"{done}; {c['dead_lettered']} of {c['read']} inputs dead-lettered "
            f"{c['dead_lettered_by_reason'] or ''}").rstrip()
