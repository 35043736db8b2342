from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compiler
from compiler import CompileConfig, GraphBreakError, compile_model
from passes import DEFAULT_PIPELINE
from tests.strategies import ModelCase, models

ROOT = Path(__file__).resolve().parents[1]
CPU = CompileConfig(device="cpu")


@pytest.mark.slow
@settings(max_examples=8)  # each example is a whole compile of a random model
@given(case=models(), example_tokens=st.integers(1, 16), tokens=st.lists(st.integers(1, 40),
                                                                         min_size=1, max_size=3))
def test_compiled_equals_eager_on_random_models(case: ModelCase, example_tokens: int,
                                                tokens: list[int]) -> None:
    compiled = compile_model(case.module, case.inputs(example_tokens), CPU)
    assert compiled.report.frontend == "symbolic_trace"
    for count in tokens:  # one compiled graph for every token count
        inputs = case.inputs(count, seed=count)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), case.module(*inputs), rtol=1e-5, atol=1e-5)


def test_report_counts_flops_and_weight_bytes() -> None:
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4, bias=False)).eval()
    compiled = compile_model(model, (torch.randn(5, 6),), CPU)
    report = compiled.report
    assert report.flops_before == report.flops_after == 2 * 5 * (6 * 10 + 10 * 4)
    assert report.weight_bytes_before == 4 * (6 * 10 + 10 + 10 * 4)
    assert set(report.passes) == set(DEFAULT_PIPELINE)
    text = str(report)
    assert "cleanup" in text and "FLOPs" in text and f"{report.flops_before:,}" in text


class ShapeBranch(nn.Module):
    """symbolic_trace cannot branch on a size; Dynamo can (it guards on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            return self.proj(x).relu()
        return self.proj(x)


def test_untraceable_model_goes_through_dynamo() -> None:
    model = ShapeBranch().eval()
    compiled = compile_model(model, (torch.randn(5, 4),), CPU)
    assert compiled.report.frontend == "dynamo"
    for tokens in (3, 9):
        x = torch.randn(tokens, 4)
        torch.testing.assert_close(compiled(x), model(x))


class DataBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # depends on values: a graph break
            return x * 2
        return x


def test_graph_break_is_an_error_naming_the_line() -> None:
    with pytest.raises(GraphBreakError) as info:
        compile_model(DataBranch().eval(), (torch.randn(3, 4),), CPU)
    message = str(info.value)
    assert "DataBranch" in message
    assert f"{Path(__file__).name}:" in message  # file:line of the branch
    assert "graph break at" in message


def test_missing_example_inputs_and_wrong_device_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="has no example_inputs"):
        compile_model(nn.Linear(2, 2).eval(), None, CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            compile_model(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), CompileConfig(device="cuda"))
    else:
        with pytest.raises(ValueError, match="is on cpu"):
            compile_model(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), CompileConfig(device="cuda"))


def test_backend_with_custom_config_through_torch_compile() -> None:
    backend = compiler.backend(CompileConfig(device="cpu", passes=("cleanup",)))
    model = ShapeBranch().eval()
    optimized = torch.compile(model, backend=backend)
    x = torch.randn(6, 4)
    torch.testing.assert_close(optimized(x), model(x))
    assert backend.reports and backend.reports[-1].frontend == "dynamo"
    assert "cleanup" in backend.reports[-1].passes


def test_backend_by_name_after_import() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    optimized = torch.compile(model, backend="fxkiln")
    x = torch.randn(3, 4)
    torch.testing.assert_close(optimized(x), model(x))


@pytest.mark.slow
def test_backend_by_name_in_a_fresh_process_without_importing_compiler() -> None:
    try:
        distribution = importlib.metadata.distribution("fxkiln")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fxkiln is not pip-installed here (./dev installs it)")
    names = [ep.name for ep in distribution.entry_points if ep.group == "torch_dynamo_backends"]
    assert names == ["fxkiln"]
    code = ("import sys, torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"
            "x = torch.randn(3, 4)\n"
            "assert 'compiler' not in sys.modules\n"
            "print(torch.allclose(torch.compile(m, backend='fxkiln')(x), m(x)))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"


# -- Hugging Face models from small configs (random weights, no download) -------------------
# One layer each: these check the generic Dynamo frontend on HF code (each example is a whole
# capture); serving several layers is tests/test_hf_serving.py's.

def _tiny_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval()


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.slow
@settings(max_examples=2)  # each example is a Dynamo compile of the model
@given(batch=st.integers(1, 3), length=st.integers(2, 9))
def test_hugging_face_bart_compiles_and_matches_eager(batch: int, length: int) -> None:
    model = _tiny_bart()
    inputs = {"input_ids": torch.randint(3, 96, (batch, length)),
              "decoder_input_ids": torch.randint(3, 96, (batch, length + 1))}
    compiled = compile_model(model, inputs, CPU)
    assert compiled.report.frontend == "dynamo"
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(compiled(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@settings(max_examples=2)  # each example is a Dynamo compile of the model
@given(batch=st.integers(1, 3), length=st.integers(2, 9))
def test_hugging_face_llama_compiles_and_matches_eager(batch: int, length: int) -> None:
    model = _tiny_llama()
    inputs = {"input_ids": torch.randint(0, 96, (batch, length))}
    compiled = compile_model(model, inputs, CompileConfig(device="cpu", verify=True))
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(compiled(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    assert compiled.report.flops_before > 0


def test_layering_runtime_passes_models_never_import_compiler() -> None:
    import ast

    offenders = []
    for folder in ("runtime", "passes", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(name == "compiler" or name.startswith("compiler.") for name in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
