"""The same jobs on real distributed engines: a Dask cluster of worker processes, and Beam's
portable runner (job service + SDK workers that get latentpack only through `--setup_file`
staging, as on Flink, Spark or Dataflow). Each engine must write the very dataset the
DirectRunner writes: the same parts, byte for byte, the same dead letters, the same counts;
decoding them must write the same image files. The services are started and stopped here."""
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import BEAM_TEST_ARGS, write_tfrecord
from pipeline import decode, encode
from pipeline.tfrecord import make_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
distributed = pytest.importorskip("distributed")


# ---------------------------------------------------------------- input and what to compare

@pytest.fixture(scope="module")
def dataset(tmp_path_factory, mnist):
    """Five shards of digits with the faults a job must account for: a key seen in two shards, an
    undecodable record, a truncated tail."""
    folder = tmp_path_factory.mktemp("dist-shards")
    images, labels = mnist
    for s in range(5):
        sl = slice(30 * s, 30 * (s + 1))
        keys = [f"d/{s}/{i:02d}" for i in range(30)]
        extra = []
        if s == 1:
            keys[7] = "d/0/03"  # also in shard 0: the later one is a duplicate_key dead letter
            extra = [make_example(b"not a png", "junk")]
        path = write_tfrecord(folder / f"s{s}.tfrecord", images[sl], labels[sl], keys, extra)
        if s == 3:
            with open(path, "ab") as f:
                f.write(b"\x10\x00")  # a truncated tail
    return str(folder / "*.tfrecord")


def encoded(out):
    """What must not depend on the runner: manifest counts and parts (name, rows, CRC32C of the
    bytes), and every dead letter."""
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    letters = sorted(json.dumps(json.loads(line), sort_keys=True)
                     for f in glob.glob(f"{out}/dead_letter/*.jsonl") for line in open(f))
    parts = [(p["name"], p["rows"], p["crc32c"]) for p in manifest["files"]]
    return manifest["counts"], parts, manifest["dead_letter_files"], letters


def decoded(out):
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    files = {name: open(os.path.join(out, name), "rb").read() for name in manifest["files"]}
    return manifest["counts"], files


@pytest.fixture(scope="module")
def direct(dataset, rd_model_dir, tmp_path_factory):
    """The DirectRunner's dataset and decoded TFRecords: the reference."""
    work = tmp_path_factory.mktemp("direct")
    lat, img = str(work / "lat"), str(work / "img")
    common = ["--max-bad-fraction", "0.1"]
    encode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", lat, "--batch-size", "8"]
               + common + BEAM_TEST_ARGS)
    decode.run(["--input", lat, "--model-dir", rd_model_dir, "--output", img, "--output-format", "tfrecord"]
               + BEAM_TEST_ARGS)
    counts, parts, _, letters = encoded(lat)
    assert counts == {"read": 152, "written": 149, "dead_lettered": 3,
                      "dead_lettered_by_reason": {"duplicate_key": 1, "truncated": 1, "undecodable": 1}}
    assert len(parts) == 5 and len(letters) == 3
    return lat, img


def assert_same_as_direct(direct, lat, img):
    assert encoded(lat) == encoded(direct[0])
    assert decoded(img) == decoded(direct[1])


# ---------------------------------------------------------------- Dask

@pytest.fixture(scope="module")
def dask_cluster():
    """A local Dask cluster of two worker processes (one thread each), as `dask-scheduler` and
    `dask-worker` would make on two machines."""
    import logging

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.ERROR)
    try:
        yield cluster
    finally:
        cluster.close()


def dask_args(cluster):
    return ["--runner", "DaskRunner", "--dask_client_address", cluster.scheduler_address]


def test_dask_runner_writes_the_direct_runners_dataset(direct, dataset, rd_model_dir, dask_cluster, tmp_path):
    lat, img = str(tmp_path / "lat"), str(tmp_path / "img")
    manifest = encode.run(["--input", dataset, "--model-dir", rd_model_dir, "--output", lat, "--batch-size", "8",
                           "--max-bad-fraction", "0.1"] + dask_args(dask_cluster))
    assert manifest["counts"]["written"] == 149
    decode.run(["--input", lat, "--model-dir", rd_model_dir, "--output", img, "--output-format", "tfrecord"]
               + dask_args(dask_cluster))
    assert_same_as_direct(direct, lat, img)
    # Both worker processes took part: each has loaded the model (two partitions per worker thread).
    with distributed.Client(dask_cluster) as client:
        loaded = client.run(lambda: bool(getattr(sys.modules.get("pipeline.codec"), "_SHARED", None)))
    assert len(loaded) == 2 and all(loaded.values()), loaded


def test_dask_incremental_encode_and_png_decode(dataset, rd_model_dir, dask_cluster, tmp_path):
    """--skip-existing on Dask: the second run reads nothing, the manifest still covers every
    part; PNG output (one file per image) from Dask workers."""
    lat = str(tmp_path / "lat")
    args = ["--input", dataset, "--model-dir", rd_model_dir, "--output", lat, "--skip-existing",
            "--max-bad-fraction", "0.1"] + dask_args(dask_cluster)
    first = encode.run(args)
    second = encode.run(args)
    assert first["counts"] == second["counts"] and second["parts_this_run"] == 0
    assert [p["crc32c"] for p in first["files"]] == [p["crc32c"] for p in second["files"]]
    png = str(tmp_path / "png")
    manifest = decode.run(["--input", lat, "--model-dir", rd_model_dir, "--output", png] + dask_args(dask_cluster))
    assert manifest["counts"]["written"] == 149 == len(glob.glob(f"{png}/d/*/*.png"))


def test_dask_encodes_an_image_folder_in_runs_as_the_direct_runner_does(mnist, rd_model_dir, dask_cluster, tmp_path,
                                                                       monkeypatch):
    """An image folder's files go in runs (`encode.work_units`), gathered by a GroupByKey after
    the duplicate-key join: on Dask, every file of every run is accounted for, bad ones included,
    and the dataset is the DirectRunner's byte for byte."""
    from PIL import Image

    from pipeline.formats import ImageFolderReader

    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(mnist[0][i][..., 0]).save(folder / f"d{i:02d}.png")
    (folder / "d40.png").write_bytes(b"not a png")
    monkeypatch.setattr(ImageFolderReader, "unit_files", 6)  # seven runs over two workers
    runs = {}
    for name, runner in (("direct", BEAM_TEST_ARGS), ("dask", dask_args(dask_cluster))):
        lat = str(tmp_path / name)
        manifest = encode.run(["--input", str(folder / "*.png"), "--input-format", "images", "--model-dir",
                               rd_model_dir, "--output", lat, "--max-bad-fraction", "0.1"] + runner)
        assert manifest["counts"] == {"read": 41, "written": 40, "dead_lettered": 1,
                                      "dead_lettered_by_reason": {"undecodable": 1}}
        runs[name] = lat
    assert encoded(runs["dask"]) == encoded(runs["direct"])


def test_a_killed_dask_worker_loses_nothing(direct, dataset, rd_model_dir, tmp_path, record_property):
    """Kill one worker process while it is encoding: Dask reruns its tasks elsewhere, and the
    job completes with every row exactly once; or the job fails for the lost worker with no
    manifest, and a re-run completes. The test proves the kill landed mid-job (the worker had
    loaded the model, the job had not finished, the scheduler lost that worker) and says which
    of the two outcomes it saw (the `outcome` property of the test's report)."""
    import logging

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.CRITICAL) as cluster, distributed.Client(cluster) as client:
        lat = str(tmp_path / "lat")
        manifest_path = os.path.join(lat, "_manifest.json")
        args = ["--input", dataset, "--model-dir", rd_model_dir, "--output", lat, "--batch-size", "8",
                "--max-bad-fraction", "0.1"] + dask_args(cluster)
        outcome = {}
        finished = threading.Event()

        def job():
            try:
                outcome["manifest"] = encode.run(args)
            except Exception as e:  # the job may fail; then nothing may look complete
                outcome["error"] = e
            finally:
                finished.set()

        thread = threading.Thread(target=job)
        thread.start()
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and not finished.is_set() and time.monotonic() < deadline:
            # A worker that has loaded the model is in the middle of encoding shards.
            busy = client.run(lambda: "pipeline.codec" in sys.modules and bool(
                sys.modules["pipeline.codec"]._SHARED))
            victim = next((addr for addr, loaded in busy.items() if loaded), None)
            finished.wait(0.05)
        assert victim is not None, "no worker started encoding"
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        mid_job = not finished.is_set() and not os.path.exists(manifest_path)
        # The scheduler notices the lost worker (its nanny may start a new one at another address).
        deadline = time.monotonic() + 60
        while victim in client.scheduler_info()["workers"] and time.monotonic() < deadline:
            finished.wait(0.05)
        lost = victim not in client.scheduler_info()["workers"]
        assert finished.wait(300)
        thread.join()
        assert mid_job, "the job had finished (or written its manifest) before the worker was killed"
        assert lost, "the scheduler never lost the killed worker"
        if "error" in outcome:
            record_property("outcome", "failed for the lost worker, then re-run")
            assert not os.path.exists(manifest_path)
            assert "worker" in f"{type(outcome['error']).__name__} {outcome['error']}".lower(), outcome["error"]
            encode.run(args)
        else:
            record_property("outcome", "completed despite the kill")
            assert outcome["manifest"]["images"] == encoded(direct[0])[0]["written"]
    counts, parts, dead_files, letters = encoded(lat)
    assert (counts, parts, dead_files, letters) == encoded(direct[0])


def test_dask_runner_name_and_missing_partitioning_get_defaults(dask_cluster):
    from pipeline.runners import DASK_RUNNER, runner_options

    # Two partitions per worker thread of the cluster (2 here), at most one per shard.
    options = runner_options(dask_args(dask_cluster), 40).get_all_options()
    assert options["runner"] == DASK_RUNNER and options["npartitions"] == 4
    assert runner_options(dask_args(dask_cluster), 3).get_all_options()["npartitions"] == 3
    options = runner_options(["--runner=DaskRunner", "--dask_partition_size", "7"], 40).get_all_options()
    assert options["runner"] == DASK_RUNNER and options["partition_size"] == 7 and not options["npartitions"]


# ---------------------------------------------------------------- Beam's portable runner

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port}")


@contextlib.contextmanager
def service(args, port, what, cwd):
    proc = subprocess.Popen([sys.executable, "-m"] + args, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, proc, what)
        yield proc
    finally:
        # The whole process group: the worker pool's SDK workers too. Nothing is left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """Beam's job service and a worker pool whose workers boot like SDK containers do
    (tests/portable_boot.py): the Beam arguments that submit a job to them."""
    work = tmp_path_factory.mktemp("portable")
    boot = work / "boot"
    boot.write_text(f"#!/bin/sh\nexec {sys.executable} {os.path.join(ROOT, 'tests', 'portable_boot.py')} \"$@\"\n")
    boot.chmod(0o755)
    job_port, pool_port = free_port(), free_port()
    with service(["apache_beam.runners.portability.local_job_service_main", "--port", str(job_port),
                  "--staging_dir", str(work / "staging")],
                 job_port, "the job service", str(work)), \
            service(["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port),
                     "--container_executable", str(boot)], pool_port, "the worker pool", str(work)):
        yield ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job_port}",
               "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool_port}",
               "--setup_file", os.path.join(ROOT, "setup.py")]


def run_cli(args, cwd):
    """The `latentpack` command, from a folder where the repository is not on the path."""
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "latentpack")] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n--- first lines ---\n" + proc.stderr[:6000]
    return proc


def test_portable_runner_with_staged_code_writes_the_direct_runners_dataset(direct, dataset, rd_model_dir,
                                                                            portable, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lat, img = str(tmp_path / "lat"), str(tmp_path / "img")
    run_cli(["encode", "--input", dataset, "--model-dir", rd_model_dir, "--output", lat, "--batch-size", "8",
             "--max-bad-fraction", "0.1"] + portable, elsewhere)
    run_cli(["decode", "--input", lat, "--model-dir", rd_model_dir, "--output", img, "--output-format", "tfrecord"]
            + portable, elsewhere)
    assert_same_as_direct(direct, lat, img)


def test_portable_workers_cannot_import_latentpack_without_staging(dataset, rd_model_dir, portable, tmp_path):
    """The proof that the test above used staging: without --setup_file the same job fails,
    because the workers' environment has no latentpack, and leaves no manifest."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lat = str(tmp_path / "lat")
    args = [a for a in portable]
    i = args.index("--setup_file")
    del args[i:i + 2]
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "latentpack"), "encode", "--input", dataset,
                           "--model-dir", rd_model_dir, "--output", lat] + args, cwd=elsewhere,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "No module named 'pipeline'" in proc.stderr
    assert not os.path.exists(os.path.join(lat, "_manifest.json"))

