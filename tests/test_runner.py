"""Runners on CPU: the replay simulator (CUDA-graph buffer semantics) and the plain runner."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

from runtime.cuda_runner import weak_ref_tensor
from runtime.memory import DeviceMemoryProfiler
from runtime.piece_runner import PieceCaptureError, StaticInputError
from runtime.graph_device import GraphDevice
from runtime.replay_simulator import HostSyncGuard, SimulatedGraph, SimulatedGraphDevice
from models import from_hf
from runtime import generate
from runtime.runner import BucketRunner, make_runner
from runtime.split import DEFAULT_SPLITTING_OPS
from runtime.step_context import decode_step_context
from tests.model_oracle import build_hf, decoder_prompt, random_ids, step_logits
from tests.runner_models import (HIDDEN, SPLITTING_OPS, CompiledLike, attention_stack_graph,
                                 causal_attention, make_weights, placeholder_weights_graph,
                                 placeholder_weights_inputs)


SIZES = (1, 2, 4, 8)
LARGEST = SIZES[-1]


def _simulated(gm: fx.GraphModule, example: list[Any], token_inputs: tuple[int, ...],
               **options: Any) -> BucketRunner:
    return make_runner(gm, example, device="cpu", capture_sizes=SIZES,
                       splitting_ops=SPLITTING_OPS, token_input_indices=token_inputs,
                       simulate=True, **options)


class Model:
    """A graph, its simulated runner and a way to make inputs for n tokens."""

    def __init__(self, gm: fx.GraphModule, make_inputs: Any, token_inputs: tuple[int, ...],
                 debug: bool) -> None:
        self.gm = gm
        self.make_inputs = make_inputs
        self.runner = _simulated(gm, make_inputs(3), token_inputs, debug=debug)


@pytest.fixture(scope="module")
def models() -> tuple[Model, Model]:
    """The stack runs in debug mode (every replay checks addresses and scalars, such as the
    token count `n` replaced by the bucket); the block runs as in production."""
    weights = make_weights()
    stack = Model(attention_stack_graph(), lambda n: [torch.randn(n, HIDDEN), n], (0,),
                  debug=True)
    block = Model(placeholder_weights_graph(),
                  lambda n: placeholder_weights_inputs(n, weights), (0, 1), debug=False)
    return stack, block


CALLS = [(model, tokens) for model in (0, 1) for tokens in range(1, LARGEST + 4)]


@given(order=st.permutations(CALLS))
def test_property_simulated_outputs_equal_eager_in_any_order(
        models: tuple[Model, Model], order: list[tuple[int, int]]) -> None:
    """Every token count 1..largest+3, two models interleaved: outputs equal eager, and no
    returned output changes when later calls replay the same or other graphs."""
    returned = []
    for model_index, tokens in order:
        model = models[model_index]
        inputs = model.make_inputs(tokens)
        expected = model.gm(*inputs)
        got = model.runner(*inputs)
        torch.testing.assert_close(got, expected)
        returned.append((got, expected))
    for got, expected in returned:
        torch.testing.assert_close(got, expected)


def test_two_calls_in_a_row_leave_the_first_output_unchanged(models: tuple[Model, Model]) -> None:
    stack = models[0]
    first_inputs, second_inputs = stack.make_inputs(3), stack.make_inputs(3)
    first = stack.runner(*first_inputs)
    kept = [t.clone() for t in first]
    stack.runner(*second_inputs)
    torch.testing.assert_close(list(first), kept)


def test_simulated_graphs_reuse_their_output_buffers(models: tuple[Model, Model]) -> None:
    """The simulator's semantics, not just the runner's: a replay rewrites the same tensors."""
    block = models[1]
    last = block.runner.piece_runners[-1]
    outputs = last.entries[4].graph.outputs
    block.runner(*block.make_inputs(3))
    before = [t.clone() for t in outputs]
    block.runner(*block.make_inputs(4))
    assert last.entries[4].graph.outputs is outputs
    assert not torch.equal(outputs[0], before[0])  # new tokens, same buffer, new values


def test_other_buckets_intermediate_memory_is_clobbered(models: tuple[Model, Model]) -> None:
    stack = models[0]
    first = stack.runner.piece_runners[0]
    stack.runner(*stack.make_inputs(2))
    intermediate = first.entries[8].graph.outputs[0]  # a captured piece's output, bucket 8
    assert torch.isnan(intermediate).all()
    stack.runner(*stack.make_inputs(7))
    assert not torch.isnan(intermediate).any()


def test_padding_that_leaks_changes_the_outputs() -> None:
    """The simulator's padding is live: a graph that mixes all rows (padding included) into
    each real row disagrees with eager, so a real leak would fail the tests above."""
    gm = fx.symbolic_trace(lambda x: x - x.mean(0, keepdim=True))
    runner = _simulated(gm, [torch.randn(3, HIDDEN)], (0,))
    x = torch.randn(3, HIDDEN)  # bucket 4: one padding row
    assert not torch.allclose(runner(x), gm(x))
    exact = torch.randn(4, HIDDEN)  # a full bucket has no padding
    torch.testing.assert_close(runner(exact), gm(exact))


def test_more_tokens_than_the_largest_bucket_run_eagerly_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    gm = attention_stack_graph(layers=1)
    runner = _simulated(gm, [torch.randn(3, HIDDEN), 3], (0,))
    with caplog.at_level(logging.WARNING, logger="runtime.runner"):
        for tokens in (LARGEST + 1, LARGEST + 5):
            x = torch.randn(tokens, HIDDEN)
            torch.testing.assert_close(runner(x, tokens), gm(x, tokens))
    warnings = [r for r in caplog.records if "more than the largest captured size" in r.message]
    assert len(warnings) == 1


def _item_block(x: torch.Tensor) -> torch.Tensor:
    scale = x[0].abs().max().item()  # a host synchronization: no graph can hold it
    y = x * scale
    out = torch.empty_like(y)
    causal_attention(y, y, y, out)
    return out + 1


def _scalar_across_pieces(x: torch.Tensor) -> torch.Tensor:
    scale = x[0].abs().max().item()
    out = torch.empty_like(x)
    causal_attention(x, x, x, out)
    return out * scale  # the scalar crosses into the next piece


def test_a_piece_that_cannot_be_captured_raises_naming_piece_and_node() -> None:
    gm = fx.symbolic_trace(_item_block)
    with pytest.raises(PieceCaptureError) as error:
        _simulated(gm, [torch.randn(3, HIDDEN)], (0,))
    item_node = next(n for n in gm.graph.nodes if n.target == "item")
    assert "'submod_0'" in str(error.value)
    assert item_node.format_node() in str(error.value)
    assert "capture_failure='eager'" in str(error.value)


def test_capture_failure_eager_runs_the_piece_eagerly_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    gm = fx.symbolic_trace(_item_block)
    with caplog.at_level(logging.WARNING, logger="runtime.piece_runner"):
        runner = _simulated(gm, [torch.randn(3, HIDDEN)], (0,), capture_failure="eager")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "'submod_0'" in caplog.records[0].message
    assert runner.stats.eager_pieces == ("submod_0", "submod_1")
    assert runner.stats.graphs == len(SIZES)  # submod_2, fed from an eager piece, at each size
    for tokens in (1, 3, 8, 2, 3):
        x = torch.randn(tokens, HIDDEN)
        torch.testing.assert_close(runner(x), gm(x))


def test_a_scalar_from_an_eager_piece_keeps_its_reader_eager(
        caplog: pytest.LogCaptureFixture) -> None:
    gm = fx.symbolic_trace(_scalar_across_pieces)
    with caplog.at_level(logging.WARNING, logger="runtime.piece_runner"):
        runner = _simulated(gm, [torch.randn(3, HIDDEN)], (0,), capture_failure="eager")
    assert len(caplog.records) == 2 and "'item'" in caplog.records[1].message
    assert runner.stats.eager_pieces == ("submod_0", "submod_1", "submod_2")
    for tokens in (1, 3, 8):
        x = torch.randn(tokens, HIDDEN)
        torch.testing.assert_close(runner(x), gm(x))


def test_debug_mode_rejects_a_non_token_input_at_another_address() -> None:
    gm = placeholder_weights_graph()
    weights = make_weights()
    runner = _simulated(gm, placeholder_weights_inputs(3, weights), (0, 1), debug=True)
    runner(*placeholder_weights_inputs(2, weights))
    moved = (weights[0].clone(), *weights[1:])
    with pytest.raises(StaticInputError, match="'embedding'"):
        runner(*placeholder_weights_inputs(2, moved))


def test_without_debug_a_graph_reads_the_tensors_it_was_captured_with() -> None:
    """The simulator is faithful: like a CUDA graph it ignores a swapped non-token input."""
    gm = placeholder_weights_graph()
    weights = make_weights()
    runner = _simulated(gm, placeholder_weights_inputs(3, weights), (0, 1))
    swapped = (weights[0] + 1, *weights[1:])
    got = runner(*placeholder_weights_inputs(2, swapped))
    torch.testing.assert_close(got, gm(*placeholder_weights_inputs(2, weights)))


def test_stats_and_device_properties_are_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = GraphDevice._read_properties

    def counting(self: GraphDevice) -> Any:
        calls.append(self)
        return original(self)

    monkeypatch.setattr(GraphDevice, "_read_properties", counting)
    runner = _simulated(attention_stack_graph(layers=1), [torch.randn(3, HIDDEN), 3], (0,))
    for tokens in (1, 5, 20):
        runner(torch.randn(tokens, HIDDEN), tokens)
    assert len(calls) == 1 and runner.device_properties.processors >= 1
    captured_pieces = sum(p.captured for p in runner.split.pieces)
    assert runner.stats.pieces == len(runner.split.pieces) == 5
    assert runner.stats.captured_sizes == SIZES
    assert runner.stats.graphs == captured_pieces * len(SIZES)
    assert runner.stats.capture_seconds > 0 and runner.stats.graph_memory_bytes >= 0


def test_make_runner_on_cpu_without_simulation_runs_the_split_module_unpadded() -> None:
    gm = attention_stack_graph(layers=1)
    runner = make_runner(gm, [torch.randn(3, HIDDEN), 3], device="cpu", capture_sizes=SIZES,
                         splitting_ops=SPLITTING_OPS, token_input_indices=(0,))
    assert type(runner.graph_device) is GraphDevice and runner.stats.captured_sizes == ()
    assert runner.stats.graphs == 0
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(runner(x, 3), gm(x, 3))
    assert isinstance(_simulated(gm, [x, 3], (0,)).graph_device, SimulatedGraphDevice)


class _DecoderLike(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(16, HIDDEN))
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (batch, seq) -> (batch, seq, HIDDEN)
        h = self.proj(self.table[ids])
        heads = h.unsqueeze(1)                           # (batch, 1, seq, HIDDEN)
        mixed = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads)
        return mixed.squeeze(1) + h


def test_dynamo_graph_with_symint_and_parameter_inputs() -> None:
    """A Dynamo graph as the lead's capture makes it: SymInt sizes and parameters as inputs;
    the token dimension is the batch (dim 0 of the ids), the sequence length stays fixed."""
    model = _DecoderLike()
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def keep(gm: fx.GraphModule, example_inputs: list[Any]) -> fx.GraphModule:
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=keep, dynamic=True, fullgraph=True)(torch.zeros(3, 5).long())
    gm, fake_inputs = graphs[0]
    params = iter(model.parameters())

    def concrete(batch: int, ids: torch.Tensor) -> list[Any]:
        values: list[Any] = []
        for x in fake_inputs:
            if isinstance(x, torch.SymInt):
                values.append(batch if int(x) == 3 else int(x))
            elif x.dtype == torch.int64:
                values.append(ids)
            else:
                values.append(next(params))
        return values

    example = concrete(3, torch.zeros(3, 5).long())
    ids_index = next(i for i, x in enumerate(example) if isinstance(x, torch.Tensor)
                     and x.dtype == torch.int64)
    runner = _simulated(gm, example, (ids_index,))
    assert sum(p.is_splitting for p in runner.split.pieces) == 1
    for batch in (1, 3, 6, 11):
        ids = torch.randint(0, 16, (batch, 5))
        inputs = [batch if i in runner._inputs.token_int_indices else x
                  for i, x in enumerate(example)]
        inputs[ids_index] = ids
        torch.testing.assert_close(runner(*inputs)[0], model(ids))


def test_invalid_arguments_say_what_was_expected() -> None:
    gm = attention_stack_graph(layers=1)
    example = [torch.randn(3, HIDDEN), 3]
    with pytest.raises(ValueError, match="capture_failure"):
        _simulated(gm, example, (0,), capture_failure="skip")
    with pytest.raises(ValueError, match="token_input_indices"):
        _simulated(gm, example, (1,))
    with pytest.raises(ValueError, match="token_input_indices"):
        _simulated(gm, example, ())
    runner = _simulated(gm, example, (0,))
    with pytest.raises(ValueError, match=r"expected shape \(tokens, 8\)"):
        runner(torch.randn(3, HIDDEN + 1), 3)
    two = _simulated(placeholder_weights_graph(), placeholder_weights_inputs(3, make_weights()),
                     (0, 1))
    ids, positions, *weights = placeholder_weights_inputs(3, make_weights())
    with pytest.raises(ValueError, match="same token count"):
        two(ids, positions[:2], *weights)


def test_host_sync_guard_allows_host_scalars_only() -> None:
    device_value, host_scalar = torch.ones(2), torch.tensor(2.0)
    with HostSyncGuard(frozenset({host_scalar.data_ptr()})):
        assert host_scalar.item() == 2.0
        with pytest.raises(RuntimeError, match="stream is capturing"):
            device_value.sum().item()
        with pytest.raises(RuntimeError, match="stream is capturing"):
            device_value.nonzero()


def test_weak_ref_tensor_aliases_without_copying() -> None:
    strong = torch.arange(12.0).view(3, 4)[1:]
    weak = weak_ref_tensor(strong)
    assert weak.data_ptr() == strong.data_ptr() and weak.stride() == strong.stride()
    strong.fill_(7.0)
    assert torch.equal(weak, strong)
    assert weak_ref_tensor(5) == 5


def test_memory_profiler_sees_a_kept_allocation() -> None:
    size = 64 * 2**20
    with DeviceMemoryProfiler("cpu") as profiler:
        kept = torch.ones(size, dtype=torch.uint8)
    assert profiler.consumed_bytes >= size // 2
    assert kept.numel() == size


def _project_runner(model: torch.nn.Module, example: tuple[torch.Tensor, ...],
                    encoder_len: int | None = None) -> BucketRunner:
    return make_runner(fx.symbolic_trace(model), example, device="cpu", capture_sizes=SIZES,
                       splitting_ops=DEFAULT_SPLITTING_OPS, token_input_indices=(0, 1),
                       simulate=True, debug=True,
                       step_context=decode_step_context(model, LARGEST, "cpu", encoder_len))



@pytest.mark.parametrize("batch", [3, 5, LARGEST + 1])
def test_llama_decode_steps_through_simulated_graphs_equal_eager(
        batch: int, replays: list[SimulatedGraph]) -> None:
    """Prefill (batch * 4 tokens) runs eagerly; decode steps of `batch` tokens replay, padded
    to a bucket (the attention op computes only the real rows), or run eagerly past it."""
    model = from_hf(build_hf("llama", seed=1))
    runner = _project_runner(model, model.example_inputs(3))
    assert sum(p.is_splitting for p in runner.split.pieces) == model.config.num_hidden_layers
    compiled = CompiledLike(model, runner)
    prompt = random_ids((batch, 4), model.config.vocab_size, seed=2)
    continuation = random_ids((batch, 5), model.config.vocab_size, seed=3)
    torch.testing.assert_close(step_logits(compiled, prompt, continuation),
                               step_logits(model, prompt, continuation))
    captured_pieces = sum(p.captured for p in runner.split.pieces)
    decode_steps = continuation.shape[1] if batch <= LARGEST else 0
    assert len(replays) == captured_pieces * decode_steps
    assert torch.equal(generate(compiled, prompt, 4, ignore_eos=True),
                       generate(model, prompt, 4, ignore_eos=True))


def test_bart_decode_steps_through_simulated_graphs_equal_eager(
        replays: list[SimulatedGraph]) -> None:
    """Captured for decode steps (no encoder tokens); the prefill step, which carries encoder
    tokens, has other non-token input shapes and runs eagerly."""
    hf = build_hf("bart", seed=4)
    model = from_hf(hf)
    empty = torch.empty(0, dtype=torch.long)
    ids, positions = model.example_inputs(3)[:2]
    runner = _project_runner(model, (ids, positions, empty, empty), encoder_len=6)
    compiled = CompiledLike(model, runner)
    encoder_ids = random_ids((3, 6), hf.config.vocab_size, seed=5)
    continuation = random_ids((3, 5), hf.config.vocab_size, seed=6)
    prompt = decoder_prompt(hf, 3)
    torch.testing.assert_close(step_logits(compiled, prompt, continuation, encoder_ids),
                               step_logits(model, prompt, continuation, encoder_ids))
    captured_pieces = sum(p.captured for p in runner.split.pieces)
    assert len(replays) == captured_pieces * continuation.shape[1]  # decode steps only
    assert torch.equal(generate(compiled, None, 4, encoder_input_ids=encoder_ids, ignore_eos=True),
                       generate(model, None, 4, encoder_input_ids=encoder_ids, ignore_eos=True))
