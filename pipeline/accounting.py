"""Every image accounted for: dead-letter output, counts, progress, and the manifest step.

Shared by the encode and decode jobs. Each job's graph ends in one chain: the workers that
write parts (or image shards) yield a summary of each, `Gather` brings the summaries to one
worker, and the manifest step checks that every planned part is there before it writes
`_manifest.json`.
"""
from __future__ import annotations

import json
import posixpath
import time
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.completion import FAILED, MANIFEST, seal, write_bytes, write_json
from pipeline.images import DeadLetter
from pipeline.errors import log

DEFAULT_MAX_BAD_FRACTION = 0.01


class Progress:
    """Logs images done, images per second and, with a `total` of work (images, or input bytes
    for encode, whose image count is not known before reading), the share done and the time
    left, at a steady interval. One per worker process: the job's total is split between workers
    only on multi-process runners, where each reports its own share of the rate."""

    def __init__(self, what: str, every_s: float = 10.0, total: int = 0, unit: str = "images"):
        self.what, self.every_s, self.total, self.unit = what, every_s, total, unit
        self.done, self.work, self.started, self.last = 0, 0, None, 0.0

    def add(self, n: int, work: int = None) -> None:
        """`n` images done; `work`: units of the total done with them (default: the images)."""
        now = time.monotonic()
        if self.started is None:
            self.started = self.last = now
        self.done += n
        self.work += n if work is None else work
        if now - self.last >= self.every_s:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            if self.total and self.work:
                share = min(1.0, self.work / self.total)
                left = elapsed * (1.0 - share) / max(share, 1e-9)
                log.info("%s %d images (%.3g images/s); %.0f%% of %d %s, ETA %s", self.what, self.done, rate,
                         100 * share, self.total, self.unit, _duration(left))
            else:
                log.info("%s %d images (%.3g images/s)", self.what, self.done, rate)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def count_reasons(letters) -> dict:
    """{reason: count} of some dead letters."""
    reasons = {}
    for letter in letters:
        reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
    return reasons


def add_reasons(total: dict, more: dict) -> dict:
    for reason, n in more.items():
        total[reason] = total.get(reason, 0) + n
    return total


def count_dead_letter(namespace: str, letter: DeadLetter) -> None:
    """Beam metrics by reason, where the runner collects them (a no-op where it does not)."""
    Metrics.counter(namespace, "dead_lettered").inc()
    Metrics.counter(namespace, f"dead_lettered_{letter.reason}").inc()


def write_dead_letters(path: str, letters) -> None:
    """Dead letters as JSON lines, written whole (a retried task rewrites the same file)."""
    write_bytes(path, "".join(json.dumps(d.to_dict(), sort_keys=True) + "\n" for d in letters).encode())


def reported(summaries, planned, what: str) -> dict:
    """{part path: summary} of the parts that reported (a retried task reports once), or an error
    if a part planned before the job did not: a manifest is never written over a missing part."""
    by_part = {s["part"]: s for s in summaries}
    missing = sorted(set(planned) - set(by_part))
    if missing:
        raise RuntimeError(f"{len(missing)} part(s) were not {what}, e.g. {missing[0]}")
    return by_part


class Gather(beam.PTransform):
    """Every element of a collection as one list, on one worker: the input of a job's last step
    (the manifest). Built from a Create, a Flatten and a GroupByKey only, so the step runs once,
    after everything upstream has finished, on every runner (no side inputs, no combiners),
    and also when the collection is empty."""

    def expand(self, pcoll):
        once = pcoll.pipeline | "Once" >> beam.Create([(None, _NOTHING)])
        keyed = pcoll | "KeyAll" >> beam.Map(lambda x: (None, x))
        return ((keyed, once)
                | "WithOnce" >> beam.Flatten()
                | "GroupAll" >> beam.GroupByKey()
                | "Elements" >> beam.Map(lambda kv: [x for x in kv[1] if x != _NOTHING]))


_NOTHING = "latentpack:nothing"


def counts(read_written: int, reasons: dict) -> dict:
    """Manifest counts; `read = written + dead_lettered` holds by construction."""
    dead = sum(reasons.values())
    return {"read": read_written + dead, "written": read_written, "dead_lettered": dead,
            "dead_lettered_by_reason": dict(sorted(reasons.items()))}


def finish(output: str, payload: dict, max_bad_fraction: float, fatal_reasons=()) -> None:
    """Write `_manifest.json`, or `_failed.json` instead when too many inputs were bad or any
    dead letter has one of `fatal_reasons`."""
    failure = failure_of(payload["counts"], max_bad_fraction, fatal_reasons)
    if failure:
        write_json(posixpath.join(output, FAILED), dict(payload, complete=False, failure=failure))
    else:
        write_json(posixpath.join(output, MANIFEST), seal(payload))


def failure_of(c: dict, max_bad_fraction: float, fatal_reasons=()) -> Optional[str]:
    """Why counts `c` fail a job (too many bad inputs, or a fatal reason), or None."""
    failure = None
    fatal = {r: n for r, n in c["dead_lettered_by_reason"].items() if r in fatal_reasons}
    if fatal:
        failure = f"dead letters that fail the job: {fatal}"
    elif c["read"] and c["dead_lettered"] / c["read"] > max_bad_fraction:
        failure = (f"{c['dead_lettered']} of {c['read']} inputs ({c['dead_lettered'] / c['read']:.1%}) could not "
                   f"be used, more than --max-bad-fraction {max_bad_fraction}; "
                   f"reasons: {c['dead_lettered_by_reason']}")
    return failure


def summary(manifest: dict, done: str) -> str:
    """One line for the end of a job: what was done and what was dead-lettered, by reason."""
    c = manifest["counts"]
    return (f"{done}; {c['dead_lettered']} of {c['read']} inputs dead-lettered "
            f"{c['dead_lettered_by_reason'] or ''}").rstrip()
