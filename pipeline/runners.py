"""Beam options for the jobs, with the defaults each runner needs to run them well.

The jobs build one graph for every runner (Create, ParDo, GroupByKey, Flatten). What differs
is set here, from the user's Beam arguments:

- Dask (`--runner DaskRunner`, against `--dask_client_address tcp://host:8786` or a local
  cluster): Beam turns each `Create` into a Dask bag of 128 elements per partition, so a job
  of a few shards would run as one task on one worker; one partition per shard is no better
  when shards are many, since every GroupByKey becomes a Dask shuffle whose task count grows
  faster than the partitions (96 one-photo shards on two warm workers: 37 s with
  `--dask_partition_size 1`, 7.5 s with `--dask_npartitions 8`, 6.3 s with this default; the
  command is `latentpack encode --input 'photos/*.jpg' --input-format images --model-dir photo:4
  --output OUT --runner DaskRunner --dask_client_address ADDR` plus the option). Unless the user
  sets `--dask_npartitions` or `--dask_partition_size`, the jobs use two partitions per worker
  thread of the cluster, at most one per shard.
"""
from __future__ import annotations

import os
from typing import List

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DASK_PARTITIONING = ("--dask_npartitions", "--dask_partition_size")
# Beam knows the Dask runner only by its full name; `--runner DaskRunner` is accepted here too.
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def is_dask(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or ""
    return (runner if isinstance(runner, str) else type(runner).__name__).rsplit(".", 1)[-1] == "DaskRunner"


def runner_options(beam_args: List[str], elements: int = 0) -> PipelineOptions:
    """The user's Beam arguments as PipelineOptions, plus per-runner defaults; `elements` is the
    number of units of work the job lists (input shards, latent parts)."""
    args = [_full_runner_name(a) for a in beam_args]
    for i, arg in enumerate(args[:-1]):
        if arg == "--runner":
            args[i + 1] = _full_runner_name(args[i + 1], bare=True)
    options = PipelineOptions(args)
    if is_dask(options):
        try:
            import apache_beam.runners.dask.dask_runner  # noqa: F401  (registers the --dask_* options)
            import dask.distributed  # noqa: F401
        except ImportError:
            from pipeline.errors import LatentpackError
            raise LatentpackError("--runner DaskRunner needs Dask: pip install 'apache-beam[dask]'") from None
        if not any(a.split("=", 1)[0] in DASK_PARTITIONING for a in args):
            threads = dask_threads(options.get_all_options().get("address"))
            partitions = max(1, min(elements or 1, 2 * threads))
            options = PipelineOptions(args + [f"--dask_npartitions={partitions}"])
    return options


def dask_threads(address) -> int:
    """Worker threads of the Dask cluster at `address` (this machine's cores when Beam will start a
    local cluster, or when the scheduler does not answer: the job itself then reports why)."""
    if not address:
        return os.cpu_count() or 1
    try:
        from distributed import Client

        with Client(address, timeout=10) as client:
            return max(1, sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()))
    except Exception:
        return os.cpu_count() or 1


def _full_runner_name(arg: str, bare: bool = False) -> str:
    if bare:
        return DASK_RUNNER if arg == "DaskRunner" else arg
    return f"--runner={DASK_RUNNER}" if arg == "--runner=DaskRunner" else arg


def check_beam_args(parser, beam_args: List[str]) -> None:
    """Refuse what neither the job nor Beam knows (a misspelled `--refnie 25` would otherwise be
    dropped by Beam with a log line and the job run with defaults): one error naming the closest
    known option. Beam's own pipeline options (every runner's, Dask's once asked for) pass."""
    import difflib

    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    from pipeline.errors import LatentpackError

    if any("dask" in a.lower() for a in beam_args):
        try:
            import apache_beam.runners.dask.dask_runner  # noqa: F401  (registers the --dask_* options)
        except ImportError:
            pass
    beam = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam)  # what PipelineOptions.get_all_options parses with
    known, unknown = beam.parse_known_args(list(beam_args))
    runner = getattr(known, "runner", None)
    if runner and "." not in runner:  # a dotted name is a runner class of the user's, imported by Beam
        from apache_beam.runners.runner import create_runner

        try:
            create_runner(_full_runner_name(runner, bare=True))
        except ValueError as e:
            valid = str(e).split("Valid values are ", 1)[-1].split(" or the fully")[0]
            raise LatentpackError(f"--runner {runner} is not a Beam runner (valid: {valid}, or the dotted name "
                                  "of a PipelineRunner class)") from None
    if not unknown:
        return
    first = unknown[0]
    if not first.startswith("-"):
        raise LatentpackError(f"unexpected argument {first!r} (options are --name value; {parser.prog} --help)")
    name = first.split("=", 1)[0]
    known = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")}
                   | {s for a in beam._actions for s in a.option_strings if s.startswith("--")})
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    raise LatentpackError(f"unknown option {name}" + (f": did you mean {close[0]}?" if close else "")
                          + f" ({parser.prog} --help lists its options; Beam's pipeline options are accepted too)")


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
