"""The variants: name -> how to run it (a command line in its own process) and on which input.

Adding a variant is one entry here; `scripts/bench.py --variants` picks among them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Dict

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")


@dataclasses.dataclass(frozen=True)
class Context:
    """Where a run reads and writes."""

    inputs: str  # glob of the TFRecord input shards
    model: str
    out: str
    latents: str  # the dense model's latent dataset of the same input (decode variants read it)
    rd_model: str = ""
    rd_latents: Dict[str, str] = dataclasses.field(default_factory=dict)


def _runner() -> list:
    return ["--runner=FnApiRunner"] if os.environ.get("BENCH_NO_PRISM") else []


def _job(module: str, *args) -> list:
    return [sys.executable, "-m", module, *args]


def _child(kind: str, *args) -> list:
    return [sys.executable, BENCH, "--child", kind, *args]


@dataclasses.dataclass(frozen=True)
class Variant:
    command: Callable[[Context], list]
    naive_input: int = 0  # 0: the size's input; k: its own input of k x (N / naive fraction) images
    needs_rd_model: bool = False


VARIANTS: Dict[str, Variant] = {
    "loop": Variant(lambda c: _child("encode-loop", c.inputs, c.model, c.out)),
    "beam": Variant(lambda c: _job("pipeline.encode", "--input", c.inputs, "--model-dir", c.model,
                                   "--output", c.out, *_runner())),
    "beam-2w": Variant(lambda c: _job("pipeline.encode", "--input", c.inputs, "--model-dir", c.model,
                                      "--output", c.out, "--direct_num_workers", "2",
                                      "--direct_running_mode", "multi_processing")),
    "naive": Variant(lambda c: _child("encode-naive", c.inputs, c.model, c.out), naive_input=1),
    "naive-4x": Variant(lambda c: _child("encode-naive", c.inputs, c.model, c.out), naive_input=4),
    "dec-loop": Variant(lambda c: _child("decode-loop", c.latents, c.model, c.out, "png")),
    "dec-loop-tfr": Variant(lambda c: _child("decode-loop", c.latents, c.model, c.out, "tfrecord")),
    "dec-beam": Variant(lambda c: _job("pipeline.decode", "--input", c.latents, "--model-dir", c.model,
                                       "--output", c.out, *_runner())),
    "dec-beam-tfr": Variant(lambda c: _job("pipeline.decode", "--input", c.latents, "--model-dir", c.model,
                                           "--output", c.out, "--output-format", "tfrecord", *_runner())),
    # One rate-distortion model, its latents stored as integers or as entropy-coded codes.
    "beam-int": Variant(lambda c: _job("pipeline.encode", "--input", c.inputs, "--model-dir", c.rd_model,
                                       "--output", c.out, "--latent-format", "int", *_runner()), needs_rd_model=True),
    "beam-code": Variant(lambda c: _job("pipeline.encode", "--input", c.inputs, "--model-dir", c.rd_model,
                                        "--output", c.out, "--latent-format", "code", *_runner()),
                         needs_rd_model=True),
    "dec-beam-int": Variant(lambda c: _job("pipeline.decode", "--input", c.rd_latents["int"], "--model-dir",
                                           c.rd_model, "--output", c.out, "--output-format", "tfrecord",
                                           *_runner()), needs_rd_model=True),
    "dec-beam-code": Variant(lambda c: _job("pipeline.decode", "--input", c.rd_latents["code"], "--model-dir",
                                            c.rd_model, "--output", c.out, "--output-format", "tfrecord",
                                            *_runner()), needs_rd_model=True),
}
