from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from compiler import CompileConfig, compile_model
from compiler.capture import symbolic_propagator
from passes import PassContext
from passes.qkv_fuse import QkvFusePass
from tests.fx_helpers import LINEAR_TARGETS, graph_body, op_counts, projections, trace
from tests.qkv_models import DecoderStack, Shape, projection_flops, shapes, stream_inputs

CPU = CompileConfig(device="cpu", verify=True)


class Golden(nn.Module):
    """Whisper's cross-attention K and V: k_proj has no bias, v_proj has one."""

    def __init__(self) -> None:
        super().__init__()
        self.k_proj = nn.Linear(8, 8, bias=False)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, encoder_out: torch.Tensor) -> torch.Tensor:
        k = self.k_proj(encoder_out).view(-1, 2, 4)
        v = self.v_proj(encoder_out).view(-1, 2, 4)
        return k + v


GOLDEN_AFTER = """\
k_v_proj_weight = self.k_v_proj_weight
k_v_proj_bias = self.k_v_proj_bias
linear_2 = torch._C._nn.linear(encoder_out, k_v_proj_weight, k_v_proj_bias)
split = linear_2.split([8, 8], dim = -1)
getitem = split[0]
getitem_1 = split[1]
view = getitem.reshape(-1, 2, 4)
view_1 = getitem_1.reshape(-1, 2, 4)
add = view + view_1
return add"""


def run_fuse(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]):
    result = QkvFusePass(PassContext())(gm)
    gm.graph.lint()
    if result.modified:  # what the PassManager does after a pass that modified the graph
        symbolic_propagator(inputs)(gm)
    return result


def test_golden() -> None:
    inputs = (torch.randn(5, 8),)
    gm = trace(Golden(), inputs)
    result = run_fuse(gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1


def test_golden_graph_is_in_the_docstring() -> None:
    doc = " ".join((QkvFusePass.__doc__ or "").split())
    for line in GOLDEN_AFTER.splitlines()[:-1]:
        assert " ".join(line.split()) in doc


def test_op_counts_and_the_fused_parameters() -> None:
    module, inputs = Golden(), (torch.randn(5, 8),)
    gm = trace(module, inputs)
    before = op_counts(gm)
    result = run_fuse(gm, inputs)
    after = op_counts(gm)
    assert (before["linear"], before["split"], before["view"]) == (2, 0, 2)
    assert (after["linear"], after["split"], after["getitem"], after["view"]) == (1, 1, 2, 0)
    assert after["reshape"] == 2 and result.matches == 1
    parameters = dict(gm.named_parameters())
    torch.testing.assert_close(parameters["k_v_proj_weight"],
                               torch.cat([module.k_proj.weight, module.v_proj.weight]))
    torch.testing.assert_close(parameters["k_v_proj_bias"],
                               torch.cat([torch.zeros(8), module.v_proj.bias]))
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), module(*inputs))


class MustNotFuse(nn.Module):
    """Projections of different inputs; four of one input in one run (more than a QKV)."""

    def __init__(self) -> None:
        super().__init__()
        self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(4))

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        k, v = self.k_proj(x), self.v_proj(other)          # different inputs
        h = x * 2
        a, b, c, d = (head(h) for head in self.heads)      # four of one input, back to back
        return k + v + torch.cat([a, b, c, d], dim=-1)


def test_must_not_fuse_projections_of_different_inputs_or_runs_of_four() -> None:
    inputs = (torch.randn(3, 8), torch.randn(3, 8))
    gm = trace(MustNotFuse(), inputs)
    before = op_counts(gm)
    result = run_fuse(gm, inputs)
    assert not result.modified and op_counts(gm) == before


def test_layers_reading_one_encoder_output_fuse_per_layer_not_across() -> None:
    shape, layers = Shape(hidden=16, heads=4, kv_heads=2), 3
    module = DecoderStack(shape, layers, fused=False).eval()
    inputs = stream_inputs(shape, 2, 5)
    gm = trace(module, inputs)
    assert run_fuse(gm, inputs).matches == 2 * layers  # self-attention QKV, cross-attention KV
    kv_width = 2 * shape.kv_size
    readers = [n for n in gm.graph.nodes if n.op == "call_function" and
               n.target is torch._C._nn.linear and n.args[0].name == "encoder_out"]
    assert [int(n.meta["val"].shape[-1]) for n in readers] == [kv_width] * layers


@pytest.mark.slow
@settings(max_examples=6)  # each example propagates shapes through SDPA three times
@given(shape=shapes(), layers=st.integers(1, 2), tokens=st.integers(1, 6),
       encoder_tokens=st.integers(1, 6), other=st.integers(1, 9))
def test_fuse_preserves_results_flops_and_is_idempotent(shape: Shape, layers: int, tokens: int,
                                                       encoder_tokens: int, other: int) -> None:
    torch.manual_seed(layers)
    module = DecoderStack(shape, layers, fused=False).eval()
    inputs = stream_inputs(shape, tokens, encoder_tokens)
    gm = trace(module, inputs)
    flops_before = projection_flops(gm, *inputs)
    assert run_fuse(gm, inputs).matches == 2 * layers
    assert not run_fuse(gm, inputs).modified
    assert projection_flops(gm, *inputs) == flops_before
    for count in (tokens, other):
        x = stream_inputs(shape, count, other, seed=count)
        with torch.no_grad():
            torch.testing.assert_close(gm(*x), module(*x), rtol=1e-5, atol=1e-5)


def test_pipeline_on_our_bart_structure_narrows_and_fuses_nothing_across_layers() -> None:
    shape, layers = Shape(hidden=16, heads=4, kv_heads=4, tp=2), 2
    module = DecoderStack(shape, layers).eval()
    compiled = compile_model(module, stream_inputs(shape, 3, 5), CPU)
    passes = compiled.report.passes
    assert passes["qkv_split"].matches == 2 * layers and passes["qkv_fuse"].matches == 0
    decode_waste = 2 * 3 * shape.hidden * 2 * shape.kv_size * layers
    encode_waste = 2 * 5 * shape.hidden * shape.q_size * layers
    assert compiled.report.flops_before - compiled.report.flops_after == decode_waste + encode_waste


# -- Hugging Face encoder-decoders from tiny configs (random weights, no download) -----------

def _bart() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    inputs = {"input_ids": torch.randint(3, 100, (2, 5)),
              "decoder_input_ids": torch.randint(3, 100, (2, 4))}
    return BartForConditionalGeneration(config).eval(), inputs


def _t5() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=2, num_heads=4)
    inputs = {"input_ids": torch.randint(0, 100, (2, 5)),
              "decoder_input_ids": torch.randint(0, 100, (2, 4))}
    return T5ForConditionalGeneration(config).eval(), inputs


def _whisper() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=32, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    inputs = {"input_features": torch.randn(1, 8, 32),
              "decoder_input_ids": torch.randint(3, 100, (1, 4))}
    return WhisperForConditionalGeneration(config).eval(), inputs


@pytest.mark.slow
@pytest.mark.parametrize("build", [_bart, _t5, _whisper], ids=["bart", "t5", "whisper"])
def test_hugging_face_cross_kv_fuses_in_every_decoder_layer(
        build: Callable[[], tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    torch._dynamo.reset()  # shared transformers wrappers would pass Dynamo's recompile limit
    torch.manual_seed(0)
    model, inputs = build()
    compiled = compile_model(model, inputs, CPU)
    d, layers = 32, 2
    fused = [(n, weight) for n, weight, _ in projections(compiled.graph_module)
             if weight.op == "get_attr"]                   # norm-fed projections included
    widths = [tuple(weight.meta["val"].shape) for _, weight in fused]
    cross = [n for (n, _), w in zip(fused, widths) if w == (2 * d, d)]
    assert len(cross) == layers and len({n.args[0] for n in cross}) == 1  # one encoder output
    assert widths.count((3 * d, d)) == 2 * layers  # self-attention QKV, encoder and decoder
    assert compiled.report.passes["qkv_fuse"].matches == 3 * layers
    assert compiled.report.flops_after == compiled.report.flops_before
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits,
                                   rtol=1e-4, atol=1e-5)
