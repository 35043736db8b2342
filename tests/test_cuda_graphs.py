"""Real CUDA graphs (GPU only): replays equal eager, outputs survive replays, capture stats.

Run on the GPU machine: `python -m pytest tests/test_cuda_graphs.py -q -s` (-s shows the
capture time and memory of the default buckets).
"""
from __future__ import annotations

import logging
import random
from typing import Any

import pytest
import torch
from torch import fx

from compiler.config import CompileConfig
from models import from_hf
from runtime import generate
from runtime.forward_context import set_forward_context
from runtime.generation import uniform_batch_metadata
from runtime.kv_cache import allocate_kv_caches
from runtime.piece_runner import PieceCaptureError, StaticInputError
from runtime.runner import BucketRunner, make_runner
from runtime.split import DEFAULT_SPLITTING_OPS
from runtime.step_context import decode_step_context
from tests.model_oracle import build_hf, random_ids
from tests.runner_models import (HIDDEN, SPLITTING_OPS, CompiledLike, attention_stack_graph,
                                 causal_attention, make_weights, placeholder_weights_graph,
                                 placeholder_weights_inputs)

pytestmark = pytest.mark.gpu

SIZES = (1, 2, 4, 8)
CUDA = torch.device("cuda")
GRAPH_DEVICE_CLASS = "CUDAGraphDevice"
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # eager and replay may pick different SDPA kernels


def _runner(gm: fx.GraphModule, example: list[Any], token_inputs: tuple[int, ...],
            sizes: tuple[int, ...] = SIZES, **options: Any) -> BucketRunner:
    return make_runner(gm, example, device=CUDA, capture_sizes=sizes,
                       splitting_ops=SPLITTING_OPS, token_input_indices=token_inputs, **options)


def _stack(layers: int = 2) -> fx.GraphModule:
    return attention_stack_graph(layers).to(CUDA)


def test_cuda_graphs_equal_eager_for_every_token_count_two_models_interleaved() -> None:
    stack = _stack()
    weights = make_weights(CUDA)
    block = placeholder_weights_graph()
    models = {
        "stack": (stack, lambda n: [torch.randn(n, HIDDEN, device=CUDA), n],
                  _runner(stack, [torch.randn(3, HIDDEN, device=CUDA), 3], (0,))),
        "block": (block, lambda n: placeholder_weights_inputs(n, weights, CUDA),
                  _runner(block, placeholder_weights_inputs(3, weights, CUDA), (0, 1))),
    }
    assert type(models["stack"][2].graph_device).__name__ == GRAPH_DEVICE_CLASS
    calls = [(name, n) for name in models for n in range(1, SIZES[-1] + 4)] * 2
    random.Random(0).shuffle(calls)
    returned = []
    for name, tokens in calls:
        gm, make_inputs, runner = models[name]
        inputs = make_inputs(tokens)
        got, expected = runner(*inputs), gm(*inputs)
        torch.testing.assert_close(got, expected, **TOLERANCE)
        returned.append((got, expected))
    torch.cuda.synchronize()
    for got, expected in returned:  # nothing returned was overwritten by a later replay
        torch.testing.assert_close(got, expected, **TOLERANCE)


def test_cuda_output_survives_replays_of_same_and_other_buckets() -> None:
    stack = _stack()
    runner = _runner(stack, [torch.randn(3, HIDDEN, device=CUDA), 3], (0,))
    first = runner(torch.randn(3, HIDDEN, device=CUDA), 3)
    kept = [t.clone() for t in first]
    runner(torch.randn(3, HIDDEN, device=CUDA), 3)
    runner(torch.randn(7, HIDDEN, device=CUDA), 7)
    torch.testing.assert_close(list(first), kept, atol=0, rtol=0)


def test_cuda_device_properties_are_cached_once() -> None:
    runner = _runner(_stack(1), [torch.randn(3, HIDDEN, device=CUDA), 3], (0,))
    expected = torch.cuda.get_device_properties(CUDA)
    properties = runner.device_properties
    assert properties.name == expected.name
    assert properties.capability == (expected.major, expected.minor)
    assert properties.processors == expected.multi_processor_count
    runner(torch.randn(5, HIDDEN, device=CUDA), 5)
    assert runner.device_properties is properties


def test_default_buckets_capture_time_and_memory(caplog: pytest.LogCaptureFixture,
                                                 record_property: Any) -> None:
    sizes = CompileConfig().capture_sizes
    stack = _stack(layers=4)
    with caplog.at_level(logging.INFO, logger="runtime.runner"):
        runner = _runner(stack, [torch.randn(3, HIDDEN, device=CUDA), 3], (0,), sizes=sizes)
    stats = runner.stats
    captured = sum(p.captured for p in runner.split.pieces)
    assert stats.captured_sizes == sizes
    assert stats.graphs == captured * len(sizes)
    assert stats.capture_seconds > 0 and stats.graph_memory_bytes >= 0
    message = f"captured {stats.graphs} graphs for {len(sizes)} sizes (0 prefill) in "
    assert any(message in r.getMessage() for r in caplog.records)
    record_property("capture_seconds", stats.capture_seconds)
    record_property("graph_memory_bytes", stats.graph_memory_bytes)
    print(f"\ndefault buckets {sizes}: {stats.graphs} graphs, {stats.capture_seconds:.3f} s, "
          f"{stats.graph_memory_bytes / 2**20:.1f} MiB")
    for tokens in (1, 5, sizes[-1]):
        x = torch.randn(tokens, HIDDEN, device=CUDA)
        torch.testing.assert_close(runner(x, tokens), stack(x, tokens), **TOLERANCE)


def test_cuda_debug_mode_rejects_a_moved_non_token_input() -> None:
    weights = make_weights(CUDA)
    block = placeholder_weights_graph()
    runner = _runner(block, placeholder_weights_inputs(3, weights, CUDA), (0, 1), debug=True)
    runner(*placeholder_weights_inputs(2, weights, CUDA))
    moved = (weights[0].clone(), *weights[1:])
    with pytest.raises(StaticInputError, match="'embedding'"):
        runner(*placeholder_weights_inputs(2, moved, CUDA))


def _project_runner(model: torch.nn.Module, example: tuple[torch.Tensor, ...],
                    encoder_len: int | None = None) -> BucketRunner:
    return make_runner(fx.symbolic_trace(model), example, device=CUDA, capture_sizes=SIZES,
                       splitting_ops=DEFAULT_SPLITTING_OPS, token_input_indices=(0, 1),
                       step_context=decode_step_context(model, SIZES[-1], CUDA, encoder_len))


@torch.no_grad()
def _decode_logits(model: Any, spec_model: Any, first: torch.Tensor, steps: torch.Tensor,
                   encoder_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a one-token-per-sequence first step (with the encoder, if any) and then one
    decode step per column of `steps`: (steps + 1, batch, vocab)."""
    batch, max_len = first.shape[0], steps.shape[1] + 1
    encoder_len = None if encoder_ids is None else encoder_ids.shape[1]
    caches = allocate_kv_caches(spec_model.attention_specs(), batch * max_len,
                                batch * (encoder_len or 0), spec_model.dtype, CUDA)
    encoder_inputs: tuple[torch.Tensor, ...] = ()
    if encoder_ids is not None:
        encoder_inputs = (encoder_ids.reshape(-1),
                          torch.arange(encoder_ids.shape[1], device=CUDA).repeat(batch))
    empty = torch.empty(0, dtype=torch.long, device=CUDA)
    outputs = []
    for step in range(max_len):
        tokens = first[:, 0] if step == 0 else steps[:, step - 1]
        metadata = uniform_batch_metadata(batch, 1, step + 1, max_len, CUDA, encoder_len,
                                          encoder_len or 0 if step == 0 else 0)
        extra = encoder_inputs if step == 0 else (empty, empty) if encoder_inputs else ()
        with set_forward_context(metadata, caches):
            outputs.append(model(tokens, torch.full((batch,), step, device=CUDA), *extra))
    return torch.stack(outputs)


@pytest.mark.parametrize("batch", [3, SIZES[-1]])
def test_llama_decode_steps_through_cuda_graphs_equal_eager(batch: int) -> None:
    model = from_hf(build_hf("llama", seed=1)).to(CUDA)
    runner = _project_runner(model, model.example_inputs(3))
    compiled = CompiledLike(model, runner)
    vocab = model.config.vocab_size
    first = random_ids((batch, 1), vocab, seed=2).to(CUDA)
    steps = random_ids((batch, 6), vocab, seed=3).to(CUDA)
    torch.testing.assert_close(_decode_logits(compiled, model, first, steps),
                               _decode_logits(model, model, first, steps), **TOLERANCE)
    prompt = random_ids((batch, 4), vocab, seed=4).to(CUDA)
    assert torch.equal(generate(compiled, prompt, 8, ignore_eos=True),
                       generate(model, prompt, 8, ignore_eos=True))


def test_bart_decode_steps_through_cuda_graphs_equal_eager() -> None:
    hf = build_hf("bart", seed=4)
    model = from_hf(hf).to(CUDA)
    empty = torch.empty(0, dtype=torch.long, device=CUDA)
    ids, positions = model.example_inputs(3)[:2]
    runner = _project_runner(model, (ids, positions, empty, empty), encoder_len=6)
    compiled = CompiledLike(model, runner)
    vocab = hf.config.vocab_size
    encoder_ids = random_ids((3, 6), vocab, seed=5).to(CUDA)
    first = torch.full((3, 1), hf.config.decoder_start_token_id, device=CUDA)
    steps = random_ids((3, 6), vocab, seed=6).to(CUDA)
    torch.testing.assert_close(_decode_logits(compiled, model, first, steps, encoder_ids),
                               _decode_logits(model, model, first, steps, encoder_ids),
                               **TOLERANCE)
    assert torch.equal(generate(compiled, None, 8, encoder_input_ids=encoder_ids, ignore_eos=True),
                       generate(model, None, 8, encoder_input_ids=encoder_ids, ignore_eos=True))


def _item_block(x: torch.Tensor) -> torch.Tensor:
    scale = x[0].abs().max().item()  # a device-to-host copy: stream capture rejects it
    y = x * scale
    out = torch.empty_like(y)
    causal_attention(y, y, y, out)
    return out + 1


def test_cuda_capture_failure_names_the_node_or_runs_eagerly() -> None:
    gm = fx.symbolic_trace(_item_block)
    example = [torch.randn(3, HIDDEN, device=CUDA)]
    with pytest.raises(PieceCaptureError) as error:
        _runner(gm, example, (0,))
    item_node = next(n for n in gm.graph.nodes if n.target == "item")
    assert "'submod_0'" in str(error.value) and item_node.format_node() in str(error.value)
    runner = _runner(gm, example, (0,), capture_failure="eager")
    assert "submod_0" in runner.stats.eager_pieces
    for tokens in (1, 3, 8):
        x = torch.randn(tokens, HIDDEN, device=CUDA)
        torch.testing.assert_close(runner(x), gm(x), **TOLERANCE)
