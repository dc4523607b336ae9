import subprocess
import sys

import pytest

from pipeline import cli


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
