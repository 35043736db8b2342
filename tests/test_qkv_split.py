from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from compiler import CompileConfig, compile_model
from compiler.capture import symbolic_propagator
from passes import PassContext
from passes.qkv_split import QkvSplitPass
from tests.fx_helpers import LINEAR_TARGETS, graph_body, op_counts, projections, trace
from tests.qkv_models import (
    DecoderStack,
    FusedCrossAttention,
    FusedSelfAttention,
    Shape,
    projection_flops,
    shapes,
    stream_inputs,
)

SPLIT_ONLY = CompileConfig(device="cpu", passes=("qkv_split",), verify=True)


class Golden(nn.Module):
    """Our BART's cross-attention in miniature: Q from x, K and V from the encoder output."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        q, _, _ = self.qkv_proj(x).split([8, 8, 8], dim=-1)
        _, k, v = self.qkv_proj(encoder_out).split([8, 8, 8], dim=-1)
        q, k, v = (t.view(-1, 2, 4).transpose(0, 1) for t in (q, k, v))  # (heads, tokens, 4)
        return F.scaled_dot_product_attention(q, k, v)


GOLDEN_AFTER = """\
qkv_proj_weight_out_0_8 = self.qkv_proj_weight_out_0_8
qkv_proj_bias_out_0_8 = self.qkv_proj_bias_out_0_8
linear_2 = torch._C._nn.linear(x, qkv_proj_weight_out_0_8, qkv_proj_bias_out_0_8)
qkv_proj_weight_out_8_24 = self.qkv_proj_weight_out_8_24
qkv_proj_bias_out_8_24 = self.qkv_proj_bias_out_8_24
linear_3 = torch._C._nn.linear(encoder_out, qkv_proj_weight_out_8_24, qkv_proj_bias_out_8_24)
split_2 = linear_3.split([8, 8], dim = -1)
getitem_6 = split_2[0]
getitem_7 = split_2[1]
view = linear_2.view(-1, 2, 4)
transpose = view.transpose(0, 1)
view_1 = getitem_6.view(-1, 2, 4)
transpose_1 = view_1.transpose(0, 1)
view_2 = getitem_7.view(-1, 2, 4)
transpose_2 = view_2.transpose(0, 1)
scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(transpose, transpose_1, transpose_2)
return scaled_dot_product_attention"""


def run_split(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]):
    result = QkvSplitPass(PassContext())(gm)
    gm.graph.lint()
    if result.modified:  # what the PassManager does after a pass that modified the graph
        symbolic_propagator(inputs)(gm)
    return result


def golden_inputs(tokens: int = 3, encoder_tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(tokens, 8), torch.randn(encoder_tokens, 8)


def test_golden() -> None:
    inputs = golden_inputs()
    gm = trace(Golden(), inputs)
    result = run_split(gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 2


def test_golden_graph_is_in_the_docstring() -> None:
    doc = " ".join((QkvSplitPass.__doc__ or "").split())
    for line in GOLDEN_AFTER.splitlines()[:9]:
        assert " ".join(line.split()) in doc


def test_op_counts_and_zero_copy_weights() -> None:
    module, inputs = Golden(), golden_inputs()
    gm = trace(module, inputs)
    before = op_counts(gm)
    result = run_split(gm, inputs)
    after = op_counts(gm)
    assert (before["linear"], before["split"], before["getitem"]) == (2, 2, 6)
    assert (after["linear"], after["split"], after["getitem"]) == (2, 1, 2)
    assert result.matches == 2
    weight = module.qkv_proj.weight
    q_rows, kv_rows = gm.qkv_proj_weight_out_0_8, gm.qkv_proj_weight_out_8_24
    assert q_rows.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert kv_rows.data_ptr() == weight[8:].data_ptr() and kv_rows.shape == (16, 8)
    assert "qkv_proj_weight_out_0_8" not in gm.state_dict()  # views, not new weights
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), module(*inputs))


def test_report_flops_and_weight_bytes_fall_by_the_unread_rows() -> None:
    shape, tokens, encoder_tokens = Shape(hidden=16, heads=4, kv_heads=2), 3, 7
    module = FusedCrossAttention(shape).eval()
    compiled = compile_model(module, stream_inputs(shape, tokens, encoder_tokens), SPLIT_ONLY)
    report = compiled.report
    q, kv, hidden = shape.q_size, shape.kv_size, shape.hidden
    rows = q + 2 * kv
    wasted = 2 * tokens * hidden * 2 * kv + 2 * encoder_tokens * hidden * q
    assert report.passes["qkv_split"].matches == 2
    assert report.flops_before - report.flops_after == wasted
    # Before: both calls read every row (and bias entry); after: Q rows once, K and V rows once.
    assert report.weight_bytes_before - report.weight_bytes_after == 4 * rows * (hidden + 1)
    assert "qkv_split" in str(report)


class GapOfOneRow(nn.Module):
    """Reads features [0, 8) and [9, 17) of 24: one unread row between two read ranges."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, second, _ = self.proj(x).split([8, 1, 8, 7], dim=-1)
        return first * second


def test_ranges_one_row_apart_stay_apart() -> None:
    """Merging them would only waste a row, so outputs cannot tell: the weight rows can."""
    module = GapOfOneRow().eval()
    compiled = compile_model(module, (torch.randn(3, 8),), SPLIT_ONLY)
    narrowed = {name: tuple(t.shape) for name, t in compiled.graph_module.named_buffers()}
    assert narrowed == {"proj_weight_out_0_8": (8, 8), "proj_bias_out_0_8": (8,),
                        "proj_weight_out_9_17": (8, 8), "proj_bias_out_9_17": (8,)}
    assert compiled.report.weight_bytes_after == 4 * 16 * (8 + 1)  # 16 rows and bias entries
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x))


class MustNotRewrite(nn.Module):
    """Every part read; a split of tokens, not features; an output read whole next to a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.a(x).split([4, 4, 4], dim=-1)         # all parts read
        first, _ = self.b(x).split([1, x.shape[0] - 1])       # dim 0: tokens
        whole = self.c(x)
        return q + k + v + first.sum() + whole[:, :4] + whole.sum()  # c is read whole too


def test_must_not_rewrite_when_all_features_are_read() -> None:
    inputs = (torch.randn(5, 8),)
    gm = trace(MustNotRewrite(), inputs)
    before = op_counts(gm)
    result = run_split(gm, inputs)
    assert not result.modified and result.matches == 0
    assert op_counts(gm) == before


def test_self_attention_is_left_alone_and_cross_attention_narrowed_in_every_layer() -> None:
    shape, layers = Shape(hidden=16, heads=4, kv_heads=4), 3
    module = DecoderStack(shape, layers).eval()
    compiled = compile_model(module, stream_inputs(shape, 2, 6), SPLIT_ONLY)
    gm = compiled.graph_module
    assert compiled.report.passes["qkv_split"].matches == 2 * layers
    widths = _projection_widths(gm)
    full = shape.q_size + 2 * shape.kv_size
    for index in range(layers):
        assert widths[f"layers.{index}.self_attn.qkv_proj.weight"] == [("norm", full)]
        assert widths[f"layers_{index}_cross_attn_qkv_proj_weight_out_0_{shape.q_size}"] == \
            [("norm", shape.q_size)]
        assert widths[f"layers_{index}_cross_attn_qkv_proj_weight_out_{shape.q_size}_{full}"] == \
            [("encoder_out", 2 * shape.kv_size)]
    for tokens in (1, 4):
        inputs = stream_inputs(shape, tokens, 5, seed=tokens)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), module(*inputs))


def _projection_widths(gm: fx.GraphModule) -> dict[str, list[tuple[str, int]]]:
    """Weight attribute -> (where the input comes from, output width) of each linear reading it."""
    widths: dict[str, list[tuple[str, int]]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            weight = node.args[1]
            source = "encoder_out" if node.args[0].name == "encoder_out" else "norm"
            widths.setdefault(str(weight.target), []).append(
                (source, int(node.meta["val"].shape[-1])))
    return widths


class HiddenPattern(nn.Module):
    """The same waste behind other names, a raw weight, 3-D views, chunk, narrow and slicing."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.in_proj_weight = nn.Parameter(torch.randn(3 * hidden, hidden) / hidden)
        self.packed = nn.Parameter(torch.randn(hidden, 4 * hidden) / hidden)  # (in, out)

    def forward(self, dec: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        batch, d = dec.shape[0], self.hidden
        fused = torch.matmul(dec, self.in_proj_weight.t())           # (batch, tokens, 3d)
        query = fused.reshape(batch, -1, 3 * d).chunk(3, dim=2)[0]    # only the first third
        keys = (mem @ self.in_proj_weight.T).narrow(-1, d, d)          # the middle third
        values = (mem @ self.in_proj_weight.T)[..., 2 * d:]            # the last third
        gate = torch.matmul(dec, self.packed).flatten(0, 1)[:, d:2 * d]  # a quarter of 4d
        scores = (query @ keys.transpose(1, 2)).softmax(-1)          # (batch, tokens, mem)
        return (scores @ values).flatten(0, 1) * gate


def test_hidden_pattern_with_other_names_and_views_is_rewritten() -> None:
    torch.manual_seed(0)
    module = HiddenPattern().eval()
    inputs = (torch.randn(2, 3, 8), torch.randn(2, 5, 8))
    compiled = compile_model(module, inputs, SPLIT_ONLY)
    assert compiled.report.passes["qkv_split"].matches == 4
    d, tokens, memory = 8, 2 * 3, 2 * 5
    minimum = 2 * tokens * d * d + 2 * memory * d * d * 2 + 2 * tokens * d * d
    assert projection_flops(compiled.graph_module, *inputs) == minimum
    other = (torch.randn(3, 4, 8), torch.randn(3, 2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(*other), module(*other))


class NeedsDynamo(FusedCrossAttention):
    """symbolic_trace cannot branch on a size, so this one is captured by Dynamo."""

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, encoder_out)
        return out * 2 if x.shape[0] > 1 else out


def test_dynamo_placeholder_weights_are_narrowed() -> None:
    shape = Shape(hidden=8, heads=2, kv_heads=1)
    module = NeedsDynamo(shape).eval()
    compiled = compile_model(module, stream_inputs(shape, 3, 6), SPLIT_ONLY)
    assert compiled.report.frontend == "dynamo"
    assert compiled.report.passes["qkv_split"].matches == 2
    assert compiled.report.flops_after < compiled.report.flops_before
    for tokens in (2, 5):
        inputs = stream_inputs(shape, tokens, 4, seed=tokens)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs), module(*inputs))


@pytest.mark.slow
@settings(max_examples=6)  # each example traces, propagates shapes through SDPA and runs twice
@given(shape=shapes(), tokens=st.integers(1, 9), encoder_tokens=st.integers(1, 9),
       other=st.integers(1, 12))
def test_split_is_exact_idempotent_and_never_adds_flops(shape: Shape, tokens: int,
                                                      encoder_tokens: int, other: int) -> None:
    torch.manual_seed(tokens)
    module = FusedCrossAttention(shape, out_proj=False).eval()
    inputs = stream_inputs(shape, tokens, encoder_tokens)
    gm = trace(module, inputs)
    flops_before = projection_flops(gm, *inputs)
    assert run_split(gm, inputs).matches == 2
    second = run_split(gm, inputs)
    assert not second.modified and second.matches == 0
    hidden, q, kv = shape.hidden, shape.q_size, shape.kv_size
    minimum = 2 * tokens * hidden * q + 2 * encoder_tokens * hidden * 2 * kv
    assert projection_flops(gm, *inputs) == minimum <= flops_before
    for count in (tokens, other):  # one graph for every token count
        x = stream_inputs(shape, count, other, seed=count)
        with torch.no_grad():
            torch.testing.assert_close(gm(*x), module(*x), rtol=1e-5, atol=1e-5)


@settings(max_examples=6)  # a refusal: each example only traces and propagates shapes
@given(shape=shapes(), tokens=st.integers(1, 6))
def test_self_attention_is_never_rewritten(shape: Shape, tokens: int) -> None:
    module = FusedSelfAttention(shape).eval()
    inputs = (torch.randn(tokens, shape.hidden),)
    gm = trace(module, inputs)
    assert not run_split(gm, inputs).modified


def test_our_bart_narrows_both_cross_attention_calls_in_every_decoder_layer() -> None:
    from models import from_hf
    from tests.model_oracle import build_hf, decoder_prompt, random_ids, step_logits

    hf = build_hf("bart", seed=3, decoder_layers=3)
    model = from_hf(hf)
    config = CompileConfig(device="cpu", capture_sizes=(), verify=True)
    compiled = compile_model(model, config=config)
    report, gm = compiled.report, compiled.graph_module
    d, layers, tokens = hf.config.d_model, hf.config.decoder_layers, 8  # example: 8 and 8 tokens
    assert report.passes["qkv_split"].matches == 2 * layers
    assert report.passes["qkv_fuse"].matches == 0  # nothing left to fuse: one KV per layer
    widths = {str(weight.target): int(value.shape[-1]) for _, weight, value in projections(gm)}
    for index in range(layers):
        cross = f"model_decoder_layers_{index}_encoder_attn_qkv_proj_weight_out"
        assert widths[f"{cross}_0_{d}"] == d and widths[f"{cross}_{d}_{3 * d}"] == 2 * d
        assert widths[f"model.decoder.layers.{index}.self_attn.qkv_proj.weight"] == 3 * d
    # Per layer: K, V on the decoder's tokens and Q on the encoder's were computed for nothing.
    assert report.flops_before - report.flops_after == layers * (2 * tokens * d * 3 * d)
    assert report.weight_bytes_before - report.weight_bytes_after == layers * 4 * 3 * d * (d + 1)
    source = random_ids((2, 5), hf.config.vocab_size, seed=4)
    prompt, continuation = decoder_prompt(hf, 2), random_ids((2, 4), hf.config.vocab_size, seed=5)
    torch.testing.assert_close(step_logits(compiled, prompt, continuation, source),
                               step_logits(model, prompt, continuation, source),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_our_bart_on_cuda_in_bf16_agrees_with_the_unsplit_graph() -> None:
    from models import from_hf
    from tests.model_oracle import build_hf, decoder_prompt, random_ids, step_logits

    hf = build_hf("bart", seed=6, decoder_layers=2).to("cuda", torch.bfloat16)
    model = from_hf(hf)
    logits = {}
    for passes in (("cleanup",), ("qkv_split", "qkv_fuse", "cleanup")):
        config = CompileConfig(device="cuda", passes=passes, capture_sizes=(1, 2, 4))
        compiled = compile_model(model, config=config)
        source = random_ids((2, 5), hf.config.vocab_size, seed=7).cuda()
        prompt = decoder_prompt(hf, 2).cuda()
        continuation = random_ids((2, 3), hf.config.vocab_size, seed=8).cuda()
        logits[passes[0]] = step_logits(compiled, prompt, continuation, source).float()
    assert compiled.report.passes["qkv_split"].matches == 4
    torch.testing.assert_close(logits["qkv_split"], logits["cleanup"], atol=5e-2, rtol=5e-2)
