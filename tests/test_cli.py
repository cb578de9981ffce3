import subprocess
import sys

import pyarrow.parquet as pq

from schemas import SOURCE


def run(*args):
    return subprocess.run([sys.executable, "-m", "capfilt.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "synth" in result.stdout


def test_synth_writes_a_valid_world(tmp_path):
    result = run("synth", "--out", str(tmp_path), "--images", "20", "--noise", "0.4", "--seed", "1")
    assert result.returncode == 0, result.stderr
    SOURCE.validate(str(tmp_path / "source"))
    assert pq.read_table(tmp_path / "ground_truth.parquet").num_rows > 20


def test_user_errors_are_one_line():
    for args in (["synth", "--out", "/tmp/x", "--noise", "3"], ["synth"], ["nope"], ["synth", "serve", "/nonexistent"]):
        result = run(*args)
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("capfilt: error:"), (args, result.stderr)
