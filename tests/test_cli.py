from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from compiler import CompileReport, cli
from compiler.demo import DemoRun, Timing, timed_interleaved

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("--device", "cpu", "--batch", "2", "--prompt-len", "3", "--new-tokens", "4")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "compiler", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_demo_compiles_bart_and_llama_generates_and_equals_eager(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", *SMALL, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "== bart-tiny: BartForConditionalGeneration" in out
    assert "== llama-tiny: LlamaForCausalLM" in out
    assert out.count("fxkiln compile report") == 2
    assert out.count("generated 2 x 4 tokens (greedy, prompt 3); equal to eager: yes") == 2
    assert out.count("tokens/s: eager ") == 2
    assert out.count("best of 5 runs each, interleaved") == 2
    assert out.count("note: CUDA graphs are GPU-only; on cpu nothing is captured") == 2
    assert "qkv_split" in out and "kernel_choice" in out  # the whole default pipeline ran


def test_demo_model_option_picks_one_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", *SMALL, "--model", "llama-tiny"]) == 0
    out = capsys.readouterr().out
    assert "== llama-tiny" in out and "bart" not in out


def test_demo_rejects_an_unknown_model_naming_the_presets(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--model", "gpt-7"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "gpt-7" in err and "llama-1b" in err and "bart-large" in err


def test_demo_exits_1_and_says_where_tokens_differ(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    eager = torch.tensor([[5, 6, 7], [8, 9, 10]])
    compiled = eager.clone()
    compiled[1, 2], compiled[0, 1] = 0, 0  # first difference: sequence 0, step 1

    def fake_run_demo(name: str, *args: Any) -> DemoRun:
        report = CompileReport(frontend="fake", captured_sizes=(1, 2))
        fake_compiled: Any = SimpleNamespace(report=report)  # the CLI reads only .report
        return DemoRun(name, "fake", fake_compiled, eager, compiled,
                       Timing(eager=(1.2, 1.0, 1.1), compiled=(0.5, 1.0, 0.6)))

    monkeypatch.setattr(cli, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--device", "cpu", "--model", "llama-tiny"]) == 1
    out = capsys.readouterr().out
    assert "equal to eager: NO (first difference: sequence 0, step 1)" in out
    assert "tokens/s: eager 6.0, compiled 12.0 (2.00x; best of 3 runs each, interleaved; " \
           "noisy: runs varied by up to 100%)" in out


def test_demo_times_eager_and_compiled_interleaved_after_one_warm_up_each() -> None:
    calls: list[str] = []

    def run(target: str) -> torch.Tensor:
        calls.append(target)
        return torch.zeros(1, 2)

    _, _, timing = timed_interleaved(run, "eager", "compiled", torch.device("cpu"), repeats=4)
    assert calls == ["eager", "compiled",                  # the warm-up runs, untimed
                     "eager", "compiled", "compiled", "eager",
                     "eager", "compiled", "compiled", "eager"]
    assert len(timing.eager) == len(timing.compiled) == 4
    assert timing.eager_best == min(timing.eager)


@pytest.mark.slow
def test_help_lists_the_commands() -> None:
    """`python -m compiler` in a fresh process (the other CLI tests call cli.main)."""
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "passes", "kernels", "config"):
        assert command in result.stdout


def test_config_command_rejects_unknown_variables(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FXKILN_CAPTURE_SIZE", "1")
    assert cli.main(["config"]) == 2
    assert "unknown environment variable FXKILN_CAPTURE_SIZE" in capsys.readouterr().err
