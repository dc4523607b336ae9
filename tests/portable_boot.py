"""A container-less SDK worker boot for the portable-runner tests.

On Flink, Spark or Dataflow, Python workers start in Beam's SDK container, whose `boot`
program fetches the job's staged artifacts, pip-installs the package staged by
`--setup_file` and starts the SDK harness. Beam's worker pool
(`python -m apache_beam.runners.worker.worker_pool_main --container_executable ...`) runs
such a program once per worker; this is that program, written in Python for a machine
without containers. It does what `boot` does for the parts these jobs use:

1. asks the provision service for the job's options and its staged artifacts;
2. fetches the artifacts from the artifact service into `<work>/staged`;
3. installs the staged sdist (`workflow.tar.gz`, built from `setup.py`) into `<work>/site`;
4. runs `apache_beam.runners.worker.sdk_worker_main` with `python -S` and a path of only
   `<work>/site`, the standard library and the environment's third-party libraries: `.pth`
   files are not read, so an editable install of latentpack in the environment is invisible,
   and the worker has latentpack only if staging delivered it.
"""
import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile

import grpc
from google.protobuf import json_format

from apache_beam.portability import common_urns
from apache_beam.portability.api import (beam_artifact_api_pb2, beam_artifact_api_pb2_grpc, beam_provision_api_pb2,
                                         beam_provision_api_pb2_grpc, beam_runner_api_pb2, endpoints_pb2)


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
        p.add_argument(f"--{flag}", required=flag != "logging_endpoint")
    args, _ = p.parse_known_args()
    metadata = [("worker_id", args.id)]

    provision = beam_provision_api_pb2_grpc.ProvisionServiceStub(grpc.insecure_channel(args.provision_endpoint))
    info = provision.GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=metadata).info

    work = tempfile.mkdtemp(prefix="latentpack-worker-")
    staged = os.path.join(work, "staged")
    os.makedirs(staged)
    retrieval = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(grpc.insecure_channel(args.artifact_endpoint))
    for dep in info.dependencies:
        if dep.role_urn != common_urns.artifact_roles.STAGING_TO.urn:
            continue
        name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
        with open(os.path.join(staged, os.path.basename(name)), "wb") as f:
            for chunk in retrieval.GetArtifact(beam_artifact_api_pb2.GetArtifactRequest(artifact=dep),
                                               metadata=metadata):
                f.write(chunk.data)

    site = os.path.join(work, "site")
    sdist = os.path.join(staged, "workflow.tar.gz")
    if os.path.exists(sdist):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--no-build-isolation", "--target", site, sdist], check=True, stdout=sys.stderr)

    libraries = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = dict(os.environ,
               PIPELINE_OPTIONS=json_format.MessageToJson(info.pipeline_options),
               SEMI_PERSISTENT_DIRECTORY=work,
               WORKER_ID=args.id,
               CONTROL_API_SERVICE_DESCRIPTOR=str(endpoints_pb2.ApiServiceDescriptor(url=args.control_endpoint)))
    if args.logging_endpoint:
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = str(endpoints_pb2.ApiServiceDescriptor(url=args.logging_endpoint))
    env.pop("PYTHONPATH", None)
    # The staged package first, the standard library next, the third-party libraries last (as
    # `site` would order them; on PYTHONPATH they would come before the standard library, where a
    # backport such as the `dataclasses` package would shadow the real module).
    start = ("import runpy, sys; sys.path[:0] = [%r]; sys.path.extend(%r); "
             "runpy.run_module('apache_beam.runners.worker.sdk_worker_main', run_name='__main__')" % (site, libraries))
    os.execve(sys.executable, [sys.executable, "-S", "-c", start], env)


if __name__ == "__main__":
    main()
