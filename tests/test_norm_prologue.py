"""norm_prologue pass: golden graph, op counts on the models, what it must leave alone,
properties (compiled == eager, idempotent, FLOPs never up)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from compiler import CompileConfig, compile_model
from compiler.capture import symbolic_propagator
from compiler.report import count_flops
from models import from_hf
from passes import DEFAULT_PIPELINE, PassContext
from passes.kernel_choice import KernelChoicePass
from passes.linear_epilogue import LinearEpiloguePass
from passes.norm_prologue import ADD_NORM_LINEAR_OP, NORM_LINEAR_OP, NormProloguePass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.model_oracle import build_hf

NORM_OPS = ("rms_norm", "fused_add_rms_norm", "layer_norm", "fused_add_layer_norm")


class Golden(nn.Module):
    """Llama's MLP half: add + RMSNorm, gate/up with its SiLU-and-mul, the residual read on."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(1.0 + 0.1 * torch.randn(8))
        self.gate_up = nn.Parameter(torch.randn(16, 8))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h, residual = torch.ops.fxkiln.fused_add_rms_norm.default(x, residual, self.norm_weight,
                                                                  1e-6)
        return torch.ops.fxkiln.linear(h, self.gate_up, None, "silu_and_mul") + residual


GOLDEN_BEFORE = """\
norm_weight = self.norm_weight
fused_add_rms_norm_default = torch.ops.fxkiln.fused_add_rms_norm.default(x, residual, norm_weight, 1e-06)
getitem = fused_add_rms_norm_default[0]
getitem_1 = fused_add_rms_norm_default[1]
gate_up = self.gate_up
linear = torch.ops.fxkiln.linear(getitem, gate_up, None, 'silu_and_mul')
add = linear + getitem_1
return add"""
GOLDEN_AFTER = """\
norm_weight = self.norm_weight
gate_up = self.gate_up
add_norm_linear_default = torch.ops.fxkiln.add_norm_linear.default(x, residual, norm_weight, None, 1e-06, 'rms', gate_up, None, 'silu_and_mul', 'sum')
getitem_2 = add_norm_linear_default[0]
getitem_3 = add_norm_linear_default[1]
add = getitem_2 + getitem_3
return add"""


def run_pass(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
             kernels: dict[str, str] | None = None):
    result = NormProloguePass(PassContext(kernels=kernels or {}))(gm)
    gm.graph.lint()
    if result.modified:  # what the PassManager does after a pass that modified the graph
        symbolic_propagator(inputs)(gm)
    return result


def _fused(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes if node.target in (NORM_LINEAR_OP, ADD_NORM_LINEAR_OP)]


def _norms(gm: fx.GraphModule) -> int:
    counts = op_counts(gm)
    return sum(counts[op] + counts[f"{op}.default"] for op in NORM_OPS)


def test_golden() -> None:
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((NormProloguePass.__doc__ or "").split())
    for golden in (GOLDEN_BEFORE, GOLDEN_AFTER):  # the compute lines (not the weight lookups)
        compute = [line for line in golden.splitlines() if "= self." not in line]
        assert " ".join(" ".join(compute).split()) in doc


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_op_counts_on_the_project_models(kind: str) -> None:
    """Every norm of a decoder layer folds: Llama's (pre-norm, the sum carried on), BART's
    (post-norm, the normalized rows carried on). Left: the norms before the LM head (read
    through the logits' row selection) and BART's final encoder norm (read by every decoder
    layer's cross-attention K/V projection)."""
    hf = build_hf(kind, seed=3)
    passes = DEFAULT_PIPELINE[:DEFAULT_PIPELINE.index("norm_prologue")]
    config = CompileConfig(device="cpu", capture_sizes=(), passes=passes)
    after = compile_model(from_hf(hf), config=config).graph_module  # the graph the pass gets
    before = op_counts(after)
    norms_before = _norms(after)
    matches = NormProloguePass(PassContext())(after).matches
    after.graph.lint()
    if kind == "llama":
        layers = hf.config.num_hidden_layers
        assert norms_before == 2 * layers + 1
        expected_carries = ["sum"] * (2 * layers - 1)
    else:
        layers = hf.config.encoder_layers + hf.config.decoder_layers
        assert norms_before == 2 * hf.config.encoder_layers + 3 * hf.config.decoder_layers + 2
        expected_carries = ["normed"] * (norms_before - 2)  # the embeddings' norms included
    assert matches == len(_fused(after)) == norms_before - _norms(after)
    assert _norms(after) == (1 if kind == "llama" else 2)
    carries = [node.args[-1] for node in _fused(after) if node.target is ADD_NORM_LINEAR_OP]
    assert carries == expected_carries
    assert layers > 1 and op_counts(after)["linear.default"] + matches == before["linear.default"]


@pytest.mark.slow
def test_op_counts_on_the_hugging_face_serving_graph() -> None:
    """The lifted norms of a Hugging Face Llama fold the same way (compile_model(hf_model)),
    the final one into the LM head too (the serving graph selects the rows before the norm)."""
    hf = build_hf("llama", seed=4)
    compiled = compile_model(hf, config=CompileConfig(device="cpu", capture_sizes=()))
    assert compiled.report.passes["norm_prologue"].matches == 2 * hf.config.num_hidden_layers + 1
    assert set(compiled.report.kernels) >= {"norm_linear", "add_norm_linear"}


# -- must not rewrite --------------------------------------------------------------------------
class TwoProjections(nn.Module):
    """One norm read by two projections (separate q and k), one whose output is also returned,
    and a projection whose x is not the norm (a scaled norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(8))
        self.q, self.k, self.o = (nn.Parameter(torch.randn(8, 8)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shared = torch.ops.fxkiln.rms_norm(x, self.norm_weight, 1e-6)
        q = torch.ops.fxkiln.linear(shared, self.q, None, "none")
        k = torch.ops.fxkiln.linear(shared, self.k, None, "none")
        returned = torch.ops.fxkiln.layer_norm(q + k, self.norm_weight, None, 1e-5)
        scaled = torch.ops.fxkiln.rms_norm(returned, self.norm_weight, 1e-6) * 2.0
        return torch.ops.fxkiln.linear(returned, self.o, None, "none"), returned, \
            torch.ops.fxkiln.linear(scaled, self.o, None, "none")


def test_must_not_fold_a_shared_returned_or_transformed_norm() -> None:
    inputs = (torch.randn(3, 8),)
    gm = trace(TwoProjections(), inputs)
    before = graph_body(gm)
    result = run_pass(gm, inputs)
    assert not result.modified and result.matches == 0 and graph_body(gm) == before


class ResidualReadEarly(nn.Module):
    """The sum is read before the projection (the fused op would come after that reader), and
    both outputs of a second add + norm are read on besides its projection."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(8))
        self.proj = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h, summed = torch.ops.fxkiln.fused_add_rms_norm(x, residual, self.norm_weight, 1e-6)
        early = summed * 2.0
        y = torch.ops.fxkiln.linear(h, self.proj, None, "none")
        g, total = torch.ops.fxkiln.fused_add_rms_norm(y, early, self.norm_weight, 1e-6)
        return torch.ops.fxkiln.linear(g, self.proj, None, "none") * g + total


def test_must_not_fold_when_a_carried_output_is_read_first_or_both_are_read() -> None:
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    gm = trace(ResidualReadEarly(), inputs)
    before = graph_body(gm)
    result = run_pass(gm, inputs)
    assert result.matches == 0 and graph_body(gm) == before


@pytest.mark.parametrize("kernels, folded", [
    ({"fused_add_rms_norm": "native"}, 0), ({"linear": "native"}, 0),
    ({"fused_add_rms_norm": "native", "norm_linear": "native"}, 0),  # not the op it would be
    ({"fused_add_rms_norm": "native", "add_norm_linear": "native"}, 1),
    ({"rms_norm": "native"}, 1),  # another norm's kernel
    ({"fused_add_rms_norm": "auto", "linear": "auto"}, 1)])  # "auto" pins nothing
def test_a_kernel_pinned_in_the_config_keeps_its_op(kernels: dict[str, str],
                                                    folded: int) -> None:
    """kernels={"fused_add_rms_norm": ...} asks for that norm's kernel: the pair stays apart
    unless the fused op is pinned too."""
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    gm = trace(Golden(), inputs)
    assert run_pass(gm, inputs, kernels).matches == folded


# -- properties --------------------------------------------------------------------------------
class NormStack(nn.Module):
    """Layers of projection pairs between norms: pre-norm (Llama: the sum carried on) or
    post-norm (BART: the normalized rows carried on), RMSNorm or LayerNorm; the last norm's
    output is returned."""

    def __init__(self, hidden: int, layers: int, norm: str, post_norm: bool, activation: str,
                 norm_bias: bool) -> None:
        super().__init__()
        self.norm, self.post_norm, self.activation = norm, post_norm, activation
        self.has_norm_bias = norm_bias
        widths = 2 * hidden if activation == "silu_and_mul" else hidden
        self.up = nn.ParameterList(torch.randn(widths, hidden) / math.sqrt(hidden)
                                   for _ in range(layers))
        self.down = nn.ParameterList(torch.randn(hidden, hidden) / math.sqrt(hidden)
                                     for _ in range(layers))
        self.norm_weights = nn.ParameterList(1.0 + 0.1 * torch.randn(hidden)
                                             for _ in range(layers + 1))
        self.norm_biases = nn.ParameterList(0.1 * torch.randn(hidden) if norm_bias else
                                            torch.zeros(0) for _ in range(layers + 1))

    def _norm(self, index: int, x: torch.Tensor, residual: torch.Tensor | None) -> object:
        weight = self.norm_weights[index]
        bias = self.norm_biases[index] if self.has_norm_bias else None
        if self.norm == "rms":
            if residual is None:
                return torch.ops.fxkiln.rms_norm(x, weight, 1e-6)
            return torch.ops.fxkiln.fused_add_rms_norm(x, residual, weight, 1e-6)
        if residual is None:
            return torch.ops.fxkiln.layer_norm(x, weight, bias, 1e-5)
        return torch.ops.fxkiln.fused_add_layer_norm(x, residual, weight, bias, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, residual = self._norm(0, x, None), x  # (tokens, hidden) each
        for index, (up, down) in enumerate(zip(self.up, self.down)):
            y = F.linear(h, up)
            y = torch.ops.fxkiln.silu_and_mul(y) if self.activation == "silu_and_mul" else \
                F.gelu(y) if self.activation == "gelu" else y
            y = F.linear(y, down)
            h, summed = self._norm(index + 1, y, h if self.post_norm else residual)
            residual = h if self.post_norm else summed
        return h


@settings(max_examples=10)
@given(hidden=st.sampled_from([16, 24, 48]), layers=st.integers(1, 3),
       norm=st.sampled_from(["rms", "layer"]), post_norm=st.booleans(),
       activation=st.sampled_from(["none", "gelu", "silu_and_mul"]), norm_bias=st.booleans(),
       tokens=st.integers(1, 8), other_tokens=st.integers(1, 8))
def test_rewrite_preserves_results_flops_and_is_idempotent(
        hidden: int, layers: int, norm: str, post_norm: bool, activation: str, norm_bias: bool,
        tokens: int, other_tokens: int) -> None:
    torch.manual_seed(hidden + layers)
    module = NormStack(hidden, layers, norm, post_norm, activation, norm_bias and norm == "layer")
    inputs = (torch.randn(tokens, hidden),)
    gm = trace(module, inputs)
    LinearEpiloguePass(PassContext())(gm)
    symbolic_propagator(inputs)(gm)
    flops_before = count_flops(gm, inputs)
    first = run_pass(gm, inputs)
    # every norm but the returned last one; post-norm, the first too (its output is read by the
    # first projection and, as the residual, by the first add)
    assert first.matches == (layers - 1 if post_norm else layers)
    assert count_flops(gm, inputs) == flops_before
    second = run_pass(gm, inputs)
    assert not second.modified and second.matches == 0
    KernelChoicePass(PassContext())(gm)  # native on CPU: the norm op, then the projection
    assert count_flops(gm, inputs) <= flops_before
    for count in (tokens, other_tokens):
        x = torch.randn(count, hidden, generator=torch.Generator().manual_seed(count))
        with torch.no_grad():
            assert torch.equal(gm(x), module(x))  # the native twin runs exactly the same ops
