"""Beam options for the jobs, with the defaults each runner needs to run them well.

The jobs build one graph for every runner (Create, ParDo, GroupByKey, Flatten). What differs
is set here, from the user's Beam arguments:

- Dask (`--runner DaskRunner`, against `--dask_client_address tcp://host:8786` or a local
  cluster): Beam turns each `Create` into a Dask bag of 128 elements per partition, so a job
  of a few shards would run as one task on one worker. Unless the user sets
  `--dask_npartitions` or `--dask_partition_size`, each shard gets its own partition.
"""
from __future__ import annotations

from typing import List

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DASK_PARTITIONING = ("--dask_npartitions", "--dask_partition_size")
# Beam knows the Dask runner only by its full name; `--runner DaskRunner` is accepted here too.
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def is_dask(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or ""
    return (runner if isinstance(runner, str) else type(runner).__name__).rsplit(".", 1)[-1] == "DaskRunner"


def runner_options(beam_args: List[str]) -> PipelineOptions:
    """The user's Beam arguments as PipelineOptions, plus per-runner defaults."""
    args = [_full_runner_name(a) for a in beam_args]
    for i, arg in enumerate(args[:-1]):
        if arg == "--runner":
            args[i + 1] = _full_runner_name(args[i + 1], bare=True)
    options = PipelineOptions(args)
    if is_dask(options):
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            from pipeline.errors import LatentpackError
            raise LatentpackError("--runner DaskRunner needs Dask: pip install 'apache-beam[dask]'") from None
        if not any(a.split("=", 1)[0] in DASK_PARTITIONING for a in args):
            options = PipelineOptions(args + ["--dask_partition_size=1"])
    return options


def _full_runner_name(arg: str, bare: bool = False) -> str:
    if bare:
        return DASK_RUNNER if arg == "DaskRunner" else arg
    return f"--runner={DASK_RUNNER}" if arg == "--runner=DaskRunner" else arg


def either_spelling(parser, argv: List[str]) -> List[str]:
    """argv with the job's own options also accepted in Beam's snake_case (`--model_dir` for
    `--model-dir`), as launchers that pass options from a dict write them (Airflow's Beam
    operators, Dataflow templates). Beam's own options pass through unchanged."""
    ours = {s for action in parser._actions for s in action.option_strings}
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        hyphenated = name.replace("_", "-")
        if name.startswith("--") and name not in ours and hyphenated in ours:
            arg = hyphenated + sep + value
        out.append(arg)
    return out
