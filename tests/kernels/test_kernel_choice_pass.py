"""kernel_choice pass: golden graph, op counts, what it must leave alone, errors, properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from passes import DEFAULT_PIPELINE, PASSES
from passes.kernel_choice import MATCHED_TARGETS, KernelChoicePass, chosen_kernels
from runtime.kernels import native, triton_kernels
from runtime.ops import DISPATCH_OPS
from runtime.settings import kernel_settings
from tests.fx_helpers import trace
from tests.kernels.helpers import TOLERANCES, LlamaShaped, choose_kernels, count_targets

# The dispatch ops LlamaShaped (vLLM's Llama) calls.
LLAMA_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding")

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")


class NormThenSilu(torch.nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = torch.ops.fxkiln.rms_norm(x, self.weight, 1e-6)
        return torch.ops.fxkiln.silu_and_mul.default(normed)


GOLDEN_BEFORE = """
    weight = self.weight
    rms_norm = torch.ops.fxkiln.rms_norm(x, weight, 1e-06);  x = weight = None
    silu_and_mul_default = torch.ops.fxkiln.silu_and_mul.default(rms_norm);  rms_norm = None
    return silu_and_mul_default
"""
GOLDEN_AFTER = """
    weight = self.weight
    rms_norm_1 = runtime_kernels_triton_kernels_rms_norm(x, weight, 1e-06, 64, 1);  x = weight = None
    silu_and_mul = runtime_kernels_native_silu_and_mul(rms_norm_1);  rms_norm_1 = None
    return silu_and_mul
"""


def _code(gm: torch.fx.GraphModule) -> str:
    """The body of the generated forward (its signature carries type annotations)."""
    lines = [line.rstrip() for line in gm.code.strip().splitlines()]
    return "\n" + "\n".join(line for line in lines[1:] if line) + "\n"


@needs_interpreter
def test_golden_graph() -> None:
    gm = trace(NormThenSilu(), (torch.randn(4, 64),))
    assert _code(gm) == GOLDEN_BEFORE
    result = choose_kernels(gm, {"rms_norm": "triton"})
    gm.graph.lint()
    assert _code(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 2
    assert chosen_kernels(gm) == {"rms_norm": "triton", "silu_and_mul": "native"}


def test_docstring_shows_the_golden_graphs() -> None:
    docstring = " ".join((KernelChoicePass.__doc__ or "").split())
    for golden in (GOLDEN_BEFORE, GOLDEN_AFTER):
        assert " ".join(golden.split()) in docstring


def test_op_counts_on_llama_shaped_graph() -> None:
    layers = 3
    model = LlamaShaped(layers=layers)
    gm = trace(model, model.example_inputs(5))
    dispatch = set(MATCHED_TARGETS)
    before = {op: count_targets(gm, {t for t, name in MATCHED_TARGETS.items() if name == op})
              for op in DISPATCH_OPS if op in LLAMA_OPS}
    # vLLM's Llama pattern: the first layer norms without add, the final norm adds.
    assert before == {"rms_norm": 1, "fused_add_rms_norm": 2 * layers,
                      "silu_and_mul": layers, "rotary_embedding": layers}
    result = choose_kernels(gm)
    assert result.matches == sum(before.values())
    assert count_targets(gm, dispatch) == 0
    after = {fn.__name__: count_targets(gm, fn) for fn in (
        native.rms_norm, native.fused_add_rms_norm, native.silu_and_mul, native.rotary_embedding)}
    assert after == {op: count for op, count in before.items() if count}


def test_must_not_rewrite_ordinary_norm_and_silu() -> None:
    class Ordinary(torch.nn.Module):
        def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            gate, up = torch.rms_norm(x, (x.shape[-1],), weight, 1e-6).chunk(2, dim=-1)
            return F.silu(gate) * up

    gm = trace(Ordinary(), (torch.randn(3, 8), torch.randn(8)))
    before = _code(gm)
    result = choose_kernels(gm, {"rms_norm": "native", "silu_and_mul": "native"})
    assert not result.modified and result.matches == 0
    assert _code(gm) == before
    assert chosen_kernels(gm) == {}


def test_keyword_arguments_are_passed_in_schema_order() -> None:
    class Keywords(torch.nn.Module):
        def forward(self, x: torch.Tensor, residual: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
            out, new_residual = torch.ops.fxkiln.fused_add_rms_norm(
                x, weight=weight, eps=0.25, residual=residual)
            return out + new_residual

    inputs = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8))
    gm = trace(Keywords(), inputs)
    expected = gm(*inputs)
    choose_kernels(gm)
    (call,) = [n for n in gm.graph.nodes if n.target is native.fused_add_rms_norm]
    assert call.args[3] == 0.25 and not call.kwargs
    torch.testing.assert_close(gm(*inputs), expected)


@needs_interpreter
def test_explicit_choice_the_device_cannot_run_names_op_device_and_runnable() -> None:
    gm = trace(NormThenSilu(), (torch.randn(4, 64, dtype=torch.float64),))
    with pytest.raises(ValueError) as error:
        choose_kernels(gm, {"rms_norm": "triton"})
    message = str(error.value)
    assert "'rms_norm'" in message and "cpu" in message and "float64" in message
    assert "['native']" in message and "rms_norm" in message


def test_missing_shape_propagation_names_the_node() -> None:
    gm = trace(NormThenSilu())  # no inputs: no shape propagation
    with pytest.raises(ValueError, match=r"meta\['val'\].*rms_norm"):
        choose_kernels(gm)


def test_registered_after_the_passes_that_write_dispatch_ops() -> None:
    assert PASSES["kernel_choice"] is KernelChoicePass
    order = DEFAULT_PIPELINE.index
    writers = [name for name in DEFAULT_PIPELINE if name.startswith("lift_")] + ["linear_epilogue"]
    assert len(writers) > 1 and all(order(name) < order("kernel_choice") for name in writers)
    assert DEFAULT_PIPELINE[-1] == "cleanup"


CHOICES = st.sampled_from(["auto", "native", "triton"])


@pytest.mark.slow
@needs_interpreter
@given(tokens=st.integers(1, 6), kv_heads=st.integers(1, 2), group=st.integers(1, 2),
       head_size=st.sampled_from([4, 8]), hidden=st.sampled_from([8, 24]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       choices=st.tuples(CHOICES, CHOICES, CHOICES, CHOICES))
def test_compiled_equals_eager_and_pass_is_idempotent(
        tokens: int, kv_heads: int, group: int, head_size: int, hidden: int,
        dtype: torch.dtype, choices: tuple[str, str, str, str]) -> None:
    """The pass moves each kernel choice from run time to compile time and changes no
    arithmetic: the compiled graph equals eager run with the same kernel settings, bit for bit,
    in float32 and bfloat16 alike. (Against eager's default kernels a bfloat16 comparison
    measures how the implementations round, not the pass: one layer's roundings compound to
    errors above any fixed elementwise tolerance on near-zero logits. How each kernel rounds is
    tests/kernels/test_triton_kernels.py's business.)"""
    torch.manual_seed(tokens)
    model = LlamaShaped(hidden=hidden, layers=1, heads=kv_heads * group, kv_heads=kv_heads,
                        head_size=head_size, intermediate=hidden + 8).to(dtype)
    inputs = model.example_inputs(tokens)
    kernels = dict(zip(LLAMA_OPS, choices, strict=True))
    with torch.inference_mode():
        with kernel_settings(kernels):
            expected = model(*inputs)
        gm = trace(model, inputs)
        choose_kernels(gm, kernels)
        code = gm.code
        again = choose_kernels(gm, kernels)
        actual = gm(*inputs)
    assert not again.modified and again.matches == 0 and gm.code == code
    assert count_targets(gm, set(MATCHED_TARGETS)) == 0
    for op, choice in kernels.items():
        assert chosen_kernels(gm)[op] == ("native" if choice == "auto" else choice)
    assert torch.equal(actual, expected)
