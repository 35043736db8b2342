from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compiler", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_demo_prints_the_report_and_equals_eager() -> None:
    result = run_cli("demo", "--device", "cpu", "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fxkiln compile report" in result.stdout
    assert "equal to eager: yes" in result.stdout


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "passes", "kernels", "config"):
        assert command in result.stdout


def test_config_command_rejects_unknown_variables() -> None:
    result = subprocess.run([sys.executable, "-m", "compiler", "config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={"FXKILN_CAPTURE_SIZE": "1", "PATH": ""})
    assert result.returncode != 0
    assert "unknown environment variable FXKILN_CAPTURE_SIZE" in result.stderr
