import os
import subprocess
import sys

import pytest

from latentpack import cli


@pytest.mark.parametrize("command", ["train", "encode", "decode"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model-dir" in out and "default" in out


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


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
