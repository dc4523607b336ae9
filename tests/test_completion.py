"""Output folders: a job touches only what it wrote, one job at a time, and an interrupted job says so."""
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import BEAM_TEST_ARGS
from pipeline import completion, decode, encode
from pipeline.errors import LatentpackError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder):
    return {p: open(p, "rb").read() for p in glob.glob(os.path.join(folder, "**"), recursive=True)
            if os.path.isfile(p)}


def test_decode_never_deletes_or_overwrites_files_it_did_not_write(tmp_path, shards, model_dir):
    lat = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "images-00000-of-00001.tfrecord").write_bytes(b"a user's own shard")
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(str(mine))
    with pytest.raises(LatentpackError, match="not empty and was not written by an earlier latentpack decode"):
        decode.run(["--input", lat, "--model-dir", model_dir, "--output", str(mine), "--output-format", "tfrecord"]
                   + BEAM_TEST_ARGS)
    assert snapshot(str(mine)) == before


def test_decode_into_its_own_dataset_is_refused(tmp_path, shards, model_dir, monkeypatch):
    """However the two paths are spelled: relative or absolute, with `./` or `..`, or through a link."""
    lat = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    before = snapshot(lat)
    os.symlink(lat, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for source, target in ((lat, lat), (lat, os.path.join(lat, "decoded")), ("lat", "./lat/dec"),
                           ("./lat", os.path.join(lat, "..", "lat", "dec")), (lat, "link/dec"), ("link", lat)):
        with pytest.raises(LatentpackError, match="is, or is inside, the --input dataset"):
            decode.run(["--input", source, "--model-dir", model_dir, "--output", target] + BEAM_TEST_ARGS)
    assert snapshot(lat) == before


def test_encode_never_reads_its_own_output_however_it_is_spelled(tmp_path, shards, model_dir, monkeypatch):
    """`encode --input 'pics/*.png' --output ./pics` would write into the folder it reads: refused
    for every spelling of the folder (the guard once compared the strings, so `./pics` passed)."""
    lat = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    decode.run(["--input", lat, "--model-dir", model_dir, "--output", str(tmp_path / "pics")] + BEAM_TEST_ARGS)
    before = snapshot(str(tmp_path / "pics"))
    os.symlink(tmp_path / "pics", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for output in ("./pics", "pics/", str(tmp_path / "pics"), "sub/../pics", "link"):
        with pytest.raises(LatentpackError, match="matches files inside --output"):
            encode.run(["--input", "pics/**/*.png", "--input-format", "images", "--model-dir", model_dir,
                        "--output", output] + BEAM_TEST_ARGS)
    assert snapshot(str(tmp_path / "pics")) == before


def test_encode_refuses_an_output_its_input_reads_and_an_output_that_is_a_file(tmp_path, shards, model_dir):
    with pytest.raises(LatentpackError, match="matches files inside --output"):
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output",
                    os.path.dirname(shards.pattern)] + BEAM_TEST_ARGS)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LatentpackError, match="is not a folder"):
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", str(tmp_path / "afile")]
                   + BEAM_TEST_ARGS)
    with pytest.raises(LatentpackError, match="--batch-size must be at least 1"):
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", str(tmp_path / "o"),
                    "--batch-size", "0"] + BEAM_TEST_ARGS)
    with pytest.raises(LatentpackError, match="--max-pixels must be at least 1"):
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", str(tmp_path / "o"),
                    "--max-pixels", "0"] + BEAM_TEST_ARGS)
    assert not os.path.exists(tmp_path / "o")


def test_a_second_job_on_the_same_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path, shards, model_dir):
    out = tmp_path / "lat"
    out.mkdir()
    args = ["--input", shards.pattern, "--model-dir", model_dir, "--output", str(out)] + BEAM_TEST_ARGS
    live = {"job": "encode", "host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00Z"}
    (out / completion.LOCK).write_text(json.dumps(live))
    with pytest.raises(LatentpackError, match=f"another latentpack encode job is writing .*pid {os.getpid()}"):
        encode.run(args)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / completion.LOCK).write_text(json.dumps(dict(live, pid=dead.pid)))
    manifest = encode.run(args)
    assert manifest["images"] == 120 and not (out / completion.LOCK).exists()


def test_an_interrupt_that_reaches_the_entry_point_as_another_error_still_exits_130(capsys):
    """Ctrl-C landing inside TensorFlow's C++ while it handles an error of its own comes out as
    pybind11's RuntimeError (seen in CI when the interrupt hit a job loading its model): still an
    interrupt, exit 130, one line. Another RuntimeError is not one."""
    from pipeline.errors import guarded

    def job(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler raises here
        except KeyboardInterrupt:
            raise RuntimeError("pybind11::error_already_set: MISMATCH of original and normalized active exception "
                               "types: ORIGINAL InvalidArgumentError REPLACED BY KeyboardInterrupt") from None

    def broken(argv):
        raise RuntimeError("a bug")

    before = signal.getsignal(signal.SIGINT)
    try:
        assert guarded(job)([]) == 130
    finally:
        signal.signal(signal.SIGINT, before)
        logging.disable(logging.NOTSET)  # the interrupt silenced logging for the rest of the process
    assert capsys.readouterr().err.strip() == "latentpack: interrupted"
    with pytest.raises(RuntimeError, match="a bug"):
        guarded(broken)([])
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupted_job_exits_130_unmarked_and_unlocked(tmp_path, mnist, model_dir):
    from conftest import write_tfrecord

    folder = tmp_path / "in"
    folder.mkdir()
    for s in range(8):  # enough work that the interrupt, sent as the lock appears, lands mid-job
        write_tfrecord(folder / f"p{s}.tfrecord", mnist[0][(s % 4) * 500:(s % 4 + 1) * 500],
                       keys=[f"p{s}-{i}" for i in range(500)])
    out = str(tmp_path / "lat")
    proc = subprocess.Popen([sys.executable, "-m", "latentpack.cli", "encode", "--input", str(folder / "*.tfrecord"),
                             "--model-dir", model_dir, "--output", out] + BEAM_TEST_ARGS, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, completion.LOCK)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # past the claim, well before the 4,000 images are done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the job finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "latentpack: interrupted" and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, completion.MANIFEST))
    assert not os.path.exists(os.path.join(out, completion.LOCK))


def test_a_second_interrupt_during_shutdown_still_exits_130():
    script = ("import os, signal, sys, time\n"
              "from pipeline.errors import guarded\n"
              "def main(argv):\n    raise KeyboardInterrupt\n"
              "status = guarded(main)([])\n"
              "os.kill(os.getpid(), signal.SIGINT)  # as if pressed again while threads are joined\n"
              "time.sleep(30)\n"
              "sys.exit(status)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "latentpack: interrupted", proc.stderr


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, shards, model_dir):
    lat = str(tmp_path / "lat")
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = subprocess.run([sys.executable, "-m", "latentpack.cli", "decode", "--input", lat, "--model-dir",
                               model_dir, "--output", str(small / "out")] + BEAM_TEST_ARGS, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("latentpack: error: no space left on the device writing ") and str(small) in last
    assert "Traceback" not in proc.stderr


def test_the_demo_replaces_its_own_output_and_nothing_else(tmp_path):
    """`python scripts/demo.py --out ~/data` by mistake must not delete ~/data."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"precious")
    (mine / "report.json").write_text("{}")
    for script in ("demo.py", "photo_demo.py"):
        proc = subprocess.run([sys.executable, os.path.join(root, "scripts", script), "--out", str(mine)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "which an earlier run did not write" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert (mine / "photo.jpg").read_bytes() == b"precious"
    sys.path.insert(0, os.path.join(root, "scripts"))
    from outdir import start_afresh

    earlier = tmp_path / "demo-out"
    (earlier / "latents").mkdir(parents=True)
    (earlier / "report.json").write_text("{}")
    start_afresh(str(earlier), {"latents", "report.json"}, "demo")
    assert os.listdir(earlier) == []


def test_progress_reports_the_share_done_and_the_time_left(caplog, monkeypatch):
    from pipeline import accounting

    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr(accounting.time, "monotonic", lambda: next(clock))
    progress = accounting.Progress("decoded", every_s=5, total=400)
    with caplog.at_level(logging.INFO, logger="latentpack"):
        progress.add(0)      # starts the clock
        progress.add(100)    # 10 s for a quarter: 30 s left
        progress.add(100)    # 30 s for a half: 30 s left
    lines = [r.getMessage() for r in caplog.records if "decoded" in r.getMessage()]
    assert lines == ["decoded 100 images (10 images/s); 25% of 400 images, ETA 30s",
                     "decoded 200 images (6.67 images/s); 50% of 400 images, ETA 30s"]


def test_a_symbolic_link_planted_in_the_output_is_never_written_through(tmp_path, shards, model_dir):
    """Between two nightly decodes someone replaces a decoded PNG with a link to a file elsewhere
    (or links a folder out): the re-run refuses the folder, and the file the link points to is
    untouched; a link that appears while a job writes is not followed either (O_NOFOLLOW)."""
    from pipeline.completion import create_file
    from pipeline.errors import environment_error

    lat, out = str(tmp_path / "lat"), tmp_path / "png"
    encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    decode.run(["--input", lat, "--model-dir", model_dir, "--output", str(out)] + BEAM_TEST_ARGS)
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    planted = next(p for p in sorted(out.rglob("*.png")))
    planted.unlink()
    planted.symlink_to(victim)
    with pytest.raises(LatentpackError, match="holds a symbolic link"):
        decode.run(["--input", lat, "--model-dir", model_dir, "--output", str(out)] + BEAM_TEST_ARGS)
    assert victim.read_text() == "a user's file"
    planted.unlink()
    (out / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(LatentpackError, match="holds a symbolic link"):
        decode.run(["--input", lat, "--model-dir", model_dir, "--output", str(out)] + BEAM_TEST_ARGS)
    (out / "elsewhere").unlink()
    with pytest.raises(LatentpackError, match="holds a symbolic link"):
        os.symlink(victim, os.path.join(lat, "latents-99999-of-99999.parquet"))
        encode.run(["--input", shards.pattern, "--model-dir", model_dir, "--output", lat] + BEAM_TEST_ARGS)
    assert victim.read_text() == "a user's file"
    link = tmp_path / "link.png"
    link.symlink_to(victim)
    with pytest.raises(OSError) as caught:
        create_file(str(link))
    assert environment_error(caught.value).startswith("a symbolic link where the job writes a file")
    assert victim.read_text() == "a user's file"
