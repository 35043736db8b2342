"""Hugging Face `generate` through the fxkiln backend with real CUDA graphs (GPU only).

Run on the GPU machine: `python -m pytest tests/test_hf_backend_cuda.py -q -s` (-s shows the
reports). Float32: replayed graphs run the kernels eager runs, so the tokens are eager's.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import compiler
from compiler import CompileConfig
from models.presets import hf_model
from runtime.cuda_runner import CUDAPieceGraph
from tests.model_oracle import randomize_, random_ids

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CUDA = torch.device("cuda")
SIZES = (1, 2, 4)
NEW_TOKENS = 8
REPLAYED = NEW_TOKENS - 1 - 2   # decode calls, less the watched one and the captured one


@pytest.fixture
def cuda_replays(monkeypatch: pytest.MonkeyPatch) -> list[CUDAPieceGraph]:
    """Every replay of a CUDA graph of the runners, in order."""
    seen: list[CUDAPieceGraph] = []
    replay = CUDAPieceGraph.replay

    def counting(graph: CUDAPieceGraph) -> None:
        seen.append(graph)
        replay(graph)

    monkeypatch.setattr(CUDAPieceGraph, "replay", counting)
    return seen


def _generate(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    # disable_compile: on CUDA, generate would otherwise compile the forward with its own
    # default (inductor, reduce-overhead) whenever the cache is static
    options: dict[str, Any] = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, cache_implementation="static",
                                   disable_compile=True)
    if not hf.config.is_encoder_decoder:
        options["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        return hf.generate(ids, **options)


@pytest.mark.parametrize("preset", ["llama-tiny", "bart-tiny"])
@pytest.mark.parametrize("batch", [1, 3, 6])
def test_static_cache_generate_with_cuda_graphs_equals_eager(
        preset: str, batch: int, cuda_replays: list[CUDAPieceGraph]) -> None:
    torch._dynamo.reset()
    hf = hf_model(preset, CUDA)
    randomize_(hf, seed=5)
    ids = random_ids((batch, 6), hf.config.vocab_size, seed=batch).to(CUDA)
    expected = _generate(hf, ids)
    backend = compiler.backend(CompileConfig(device="cuda", capture_sizes=SIZES))
    eager_forward = hf.forward
    hf.forward = torch.compile(eager_forward, backend=backend)
    try:
        tokens = _generate(hf, ids)
        first = len(cuda_replays)
        again = _generate(hf, ids)  # a new StaticCache: captured anew, unless it took the
    finally:                        # old one's memory (then every decode call replays)
        hf.forward = eager_forward
    assert torch.equal(tokens, expected) and torch.equal(again, expected)
    decode = backend.reports[-1]
    print(f"\n{preset} batch {batch}:\n{decode}")
    captured = batch <= SIZES[-1]
    assert first == (REPLAYED if captured else 0)
    assert len(cuda_replays) - first in ((REPLAYED, NEW_TOKENS - 1) if captured else (0,))
    assert decode.pieces == 1 and decode.captured_sizes == ((batch,) if captured else ())
    if captured:
        assert decode.capture_seconds > 0 and decode.graph_memory_bytes >= 0
    else:
        assert "leading size" in decode.capture_note


def test_outputs_held_across_replays_keep_their_values(cuda_replays: list) -> None:
    """The failure reduce-overhead shows under generate: logits a caller keeps are rewritten by
    the next replay. Ours are clones."""
    torch._dynamo.reset()
    hf = hf_model("llama-tiny", CUDA)
    randomize_(hf, seed=6)
    import transformers

    cache = transformers.StaticCache(config=hf.config, max_cache_len=32)
    forward = torch.compile(hf.forward, backend=compiler.backend(
        CompileConfig(device="cuda", capture_sizes=SIZES)))
    ids = random_ids((1, 4), hf.config.vocab_size, seed=1).to(CUDA)
    kept = []
    with torch.no_grad():
        hf(input_ids=ids, past_key_values=cache, use_cache=True)  # prefill, eagerly
        token = ids[:, -1:].clone(memory_format=torch.contiguous_format)  # as argmax makes it
        for _ in range(6):
            logits = forward(input_ids=token, past_key_values=cache, use_cache=True).logits
            kept.append((logits, logits.clone()))
            token = logits[:, -1].argmax(-1, keepdim=True)
    assert len(cuda_replays) == 4
    for logits, copy in kept:
        assert torch.equal(logits, copy)


def test_a_moved_cache_is_captured_anew_into_the_same_pool(cuda_replays: list) -> None:
    """A StaticCache at a new address drops the signature's only graph and captures another.
    With a bare graph_pool_handle() the dropped graph took the pool with it, and the second
    capture failed an allocator assert ("use_count > 0"): the first cache is kept alive here
    so that the second cannot take its memory."""
    import transformers

    torch._dynamo.reset()
    hf = hf_model("llama-tiny", CUDA)
    randomize_(hf, seed=7)
    backend = compiler.backend(CompileConfig(device="cuda", capture_sizes=SIZES))
    forward = torch.compile(hf.forward, backend=backend)
    ids = random_ids((1, 4), hf.config.vocab_size, seed=2).to(CUDA)
    caches, replayed = [], []
    with torch.no_grad():
        for _ in range(2):
            caches.append(transformers.StaticCache(config=hf.config, max_cache_len=32))
            eager_cache = transformers.StaticCache(config=hf.config, max_cache_len=32)
            hf(input_ids=ids, past_key_values=caches[-1], use_cache=True)
            hf(input_ids=ids, past_key_values=eager_cache, use_cache=True)
            token = ids[:, -1:].clone()
            for _ in range(5):
                logits = forward(input_ids=token, past_key_values=caches[-1],
                                 use_cache=True).logits
                expected = hf(input_ids=token, past_key_values=eager_cache,
                              use_cache=True).logits
                torch.testing.assert_close(logits, expected)
                token = expected[:, -1].argmax(-1, keepdim=True)
            replayed.append(len(cuda_replays))
    assert caches[0].layers[0].keys.data_ptr() != caches[1].layers[0].keys.data_ptr()
    # each cache's steps replay (how many depends on when Dynamo settles on its graphs)
    assert 0 < replayed[0] < replayed[1]
    assert backend.reports[-1].captured_sizes == (1,)
