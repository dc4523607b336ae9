import os
import subprocess
import sys

import pytest

from latentpack import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    """Every command the usage lists answers --help with its flags, their defaults and its purpose."""
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: latentpack {command}") and "--model-dir" in out and "(default" in out
    assert "--input" in out or command in ("inspect", "verify")


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    usage = capsys.readouterr()
    assert all(f"  {name}" in usage.out + usage.err for name in cli.COMMANDS)
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"latentpack {version('latentpack')}"


@pytest.mark.parametrize("job,extra,message", [
    ("encode", ["--refnie", "25"], "unknown option --refnie: did you mean --refine?"),
    ("encode", ["--num_shard=3"], "unknown option --num_shard: did you mean --num-shards?"),
    ("decode", ["--ouput-format", "npz"], "unknown option --ouput-format: did you mean --output-format?"),
    ("decode", ["stray"], "unexpected argument 'stray'"),
    ("encode", ["--num-shards", "-1"], "--num-shards must be 0"),
    ("encode", ["--max-bad-fraction", "nan"], "--max-bad-fraction must be a fraction from 0 to 1 (got nan)"),
    ("decode", ["--max-bad-fraction", "1.5"], "--max-bad-fraction must be a fraction from 0 to 1"),
    ("encode", ["--runner", "NoSuchRunner"], "--runner NoSuchRunner is not a Beam runner (valid: DataflowRunner"),
])
def test_mistaken_options_are_one_error_before_any_work(job, extra, message, shards, model_dir, tmp_path, capsys):
    """A misspelled flag is not handed to Beam (which would drop it and run with defaults), and a
    value outside its range is refused; Beam's own options still pass (the tests' --runner)."""
    args = (["--input", shards.pattern, "--model-dir", model_dir] if job == "encode"
            else ["--input", str(tmp_path / "lat")])
    assert cli.main([job] + args + ["--output", str(tmp_path / "out"), "--runner=FnApiRunner",
                                     "--direct_num_workers", "2"] + extra) == 2
    err = capsys.readouterr().err
    assert f"latentpack: error: {message}" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("where,message", [
    ("file/sub", "a part of the path is a file, not a folder writing"),
    ("x" * 300, "a file name too long for the file system writing"),
])
def test_an_output_the_system_refuses_is_one_line(where, message, shards, model_dir, tmp_path):
    (tmp_path / "file").write_text("a user's file")
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "latentpack"), "encode", "--input",
                           shards.pattern, "--model-dir", model_dir, "--output", str(tmp_path / where),
                           "--runner=FnApiRunner"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"latentpack: error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "file").read_text() == "a user's file"


@pytest.mark.parametrize("command,path,message", [
    ("encode-output", "gs://latentpack-test-no-bucket/lat", "cannot use gs:// paths here"),
    ("decode-input", "s3://latentpack-test-no-bucket/lat", "cannot use s3:// paths here"),
])
def test_a_cloud_path_this_machine_cannot_use_is_one_line(command, path, message, shards, model_dir, tmp_path):
    """gs:// and s3:// with no client library, credentials or network (this machine has none):
    one error line that says what is missing, exit 2, never Beam's or the client's traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "latentpack")
    argv = {"encode-output": ["encode", "--input", shards.pattern, "--model-dir", model_dir, "--output", path],
            "decode-input": ["decode", "--input", path, "--output", str(tmp_path / "out")],
            "encode-input": ["encode", "--input", path, "--input-format", "images", "--model-dir", model_dir,
                             "--output", str(tmp_path / "out")]}[command]
    proc = subprocess.run([exe] + argv + ["--runner=FnApiRunner"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"latentpack: error: {message}") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")


def test_user_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.encode", "--input", str(tmp_path / "*.tfrecord"),
                           "--model-dir", str(tmp_path), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "latentpack: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_the_command_keeps_tensorflow_start_up_logs_quiet_unless_verbose(tmp_path, model_dir):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("latentpack") or os.path.join(os.path.dirname(sys.executable), "latentpack")
    argv = [exe, "encode", "--input", str(tmp_path / "none-*.tfrecord"), "--model-dir", model_dir,
            "--output", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [f"latentpack: error: no files match --input '{tmp_path}/none-*.tfrecord'"]
    verbose = subprocess.run(argv + ["--verbose"], capture_output=True, text=True, env=env, timeout=300)
    assert verbose.returncode == 2 and "latentpack: error: no files match" in verbose.stderr


def test_training_photos_without_a_readable_image_is_one_error_line(tmp_path, capsys):
    """The photo trainer streams its crops lazily; a glob of nothing usable must still be a user
    mistake before training starts, not TensorFlow's error from inside the input pipeline."""
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert cli.main(["train", "--arch", "spatial", "--input", str(tmp_path / "*.png"), "--input-format", "images",
                     "--model-dir", str(tmp_path / "model"), "--steps", "2", "--lambda", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "latentpack: error: no readable training images" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "model") and not os.path.exists(tmp_path / "model-checkpoints")


def test_the_readmes_photo_commands_run_as_written(tmp_path):
    """README's "Photos in three commands", each line run by the shell exactly as the README
    writes it, in a folder with `photos/` of real JPEGs (two directly in it, one in a subfolder:
    `**` takes both): the shipped photo:4 encodes, decode finds the model from the dataset, verify
    passes, and every photo comes back at its size, close to the original."""
    import re
    import shutil

    import numpy as np
    from PIL import Image

    from pipeline.images import psnr

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Photos in three commands\n+```sh\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert [c.split()[1] for c in commands] == ["encode", "decode", "verify"]
    golden = os.path.join(ROOT, "tests", "golden", "photos", "upright")
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    sources = {}
    for name, where in (("rgb", "photos"), ("rotated", "photos"), ("profiled", "photos/trip")):
        image = np.asarray(Image.open(os.path.join(golden, name + ".png")).convert("RGB"))
        Image.fromarray(image).save(tmp_path / where / f"{name}.jpg", quality=95)
        sources[f"{where[len('photos/'):] + '/' if '/' in where else ''}{name}"] = image
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for command in commands:
        proc = subprocess.run(command + " --runner=FnApiRunner" if command.split()[1] != "verify" else command,
                              shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    for key, image in sources.items():
        decoded = np.asarray(Image.open(tmp_path / "decoded" / f"{key}.png").convert("RGB"))
        assert decoded.shape == image.shape
        assert psnr(image[None], decoded[None])[0] > 27
    shutil.rmtree(tmp_path / "photos")
