"""Compiling through Dynamo touches nothing of the caller's: no compile-time run is left
written into the inputs, no guard is added, no mark is left on the caller's tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compiler
from compiler import CompileConfig, compile_model
from models.presets import hf_model
from runtime.input_snapshot import InputSnapshot

CPU = CompileConfig(device="cpu")


class CountingCache(nn.Module):
    """A module that, like a static KV cache, writes its state in place on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("keys", torch.zeros(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.keys.index_copy_(0, self.steps.view(1), x[:1])
        self.steps.add_(1)
        return self.linear(x) + self.keys.sum()


def test_compiled_call_advances_the_state_once_per_call() -> None:
    torch._dynamo.reset()
    eager, compiled_model = CountingCache(), CountingCache()
    compiled_model.load_state_dict(eager.state_dict())
    optimized = torch.compile(compiled_model, backend=compiler.backend(
        CompileConfig(device="cpu", verify=True)))  # verification runs the graph too
    for step in range(3):
        x = torch.randn(2, 4)
        torch.testing.assert_close(optimized(x), eager(x))
        assert int(compiled_model.steps) == step + 1
    torch.testing.assert_close(compiled_model.keys, eager.keys)


def test_snapshot_restores_after_each_run_only_what_was_written() -> None:
    written, untouched = torch.zeros(3), torch.ones(3)
    snapshot = InputSnapshot([written, untouched])
    for _ in range(2):  # each run starts from the snapshot, not from the run before
        with snapshot.restoring():
            written.add_(2)
            assert written.tolist() == [2.0, 2.0, 2.0]
        assert written.tolist() == [0.0, 0.0, 0.0]
    assert untouched._version == 0


@pytest.mark.slow
def test_static_cache_generate_with_a_prompt_that_fills_the_cache() -> None:
    """The issue's case: FLOP counting ran the prefill graph twice on the live StaticCache
    before restoring it, and the second run wrote past the cache (index 15, size 15)."""
    torch._dynamo.reset()
    hf = hf_model("llama-tiny")
    ids = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=8, min_new_tokens=8, cache_implementation="static")
    with torch.no_grad():
        expected = hf.generate(ids, **options)
        hf.forward = torch.compile(hf.forward, backend=compiler.backend(CPU))
        assert torch.equal(hf.generate(ids, **options), expected)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return BertModel(config).eval()


def _graphs_compiled(model: nn.Module, backend: compiler.Backend | None) -> int:
    """How many graphs Dynamo compiles for calls at four sequence lengths."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm if backend is None else backend(gm, example_inputs)

    optimized = torch.compile(model, backend=counting)
    with torch.no_grad():
        for length in (5, 6, 7, 9):
            optimized(input_ids=torch.randint(0, 64, (2, length)))
    return len(graphs)


@pytest.mark.slow
def test_compiling_adds_no_guard_so_new_lengths_reuse_the_graph() -> None:
    """BERT slices its position-id buffer to the sequence length; counting that slice's bytes
    with int() on its symbolic size specialized the graph to one length (a guard Eq(s, 5))."""
    model = _tiny_bert()
    assert _graphs_compiled(model, compiler.backend(CPU)) == _graphs_compiled(model, None)


def test_compile_model_leaves_no_mark_on_the_callers_tensors() -> None:
    class Branchy(nn.Module):  # untraceable: goes through Dynamo
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return self.proj(x).relu() * scale if x.shape[0] > 2 else self.proj(x)

    torch._dynamo.reset()
    x, scale = torch.randn(5, 4), torch.randn(5, 1)
    compiled = compile_model(Branchy().eval(), {"x": x, "scale": scale}, CPU)
    assert compiled.report.frontend == "dynamo"
    assert vars(x) == {} and vars(scale) == {}  # maybe_mark_dynamic sets attributes
    other = torch.randn(7, 4)
    torch.testing.assert_close(compiled(x=other, scale=scale[:1]),
                               compiled.model(other, scale=scale[:1]))
