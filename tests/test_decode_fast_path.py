"""The decode fast path: a session's decode step on the runner's caches is one whole-step replay
with three device ops around it; its cached slot tables are never stale; generation reads
nothing back per step without EOS and one batched read per step with it."""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.host_work import OutsideGraphOps, count_steps, replays_paused
from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import attention, generate
from runtime.generation import DecodeSession, _GenerationLoop, find_generation_model
from runtime.kernels import triton_kernels
from tests.model_oracle import LLAMA_BASE, build_hf, random_ids

# the CPU tests: whole-step graphs in the replay simulator, Triton attention interpreted
CPU_TRITON = pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32),
    reason="needs Triton (interpreted on CPU)")

SIZES = (1, 2, 4)
FAST = CompileConfig(device="cpu", capture_sizes=SIZES, simulate_capture=True,
                     kernels={"attention": "triton"}, kv_cache_tokens=256,
                     prefill_capture_sizes=())
# what a steady decode step issues outside its graph: the token copy into the graph's input,
# the clone of the logits, the packed layout copy of the step after (staged behind the replay)
STEADY_OPS = {"copy_": 1.0 + 1.0, "clone": 1.0}
VOCAB = LLAMA_BASE["vocab_size"]  # BART's too


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    # one layer: each layer's attention runs in the Triton interpreter at every capture and step
    model = from_hf(build_hf("llama", seed=41, num_key_value_heads=2, num_hidden_layers=1))
    return model, compile_model(model, config=FAST)


@pytest.fixture(scope="module")
def bart() -> tuple[Any, Any]:
    model = from_hf(build_hf("bart", seed=42, encoder_layers=1, decoder_layers=1))
    return model, compile_model(model, config=FAST)


def _session(model: Any, prompt_lens: list[int], room: int, seed: int
             ) -> tuple[DecodeSession, torch.Tensor]:
    """A prefilled session (prompts of `prompt_lens`; BART's sources one longer) and the
    logits of its prompts' last tokens."""
    encoder = find_generation_model(model).is_encoder_decoder
    session = DecodeSession(model, len(prompt_lens), prompt_lens, room,
                            [n + 1 for n in prompt_lens] if encoder else None)
    prompts = [random_ids((n,), VOCAB, seed=seed + i) for i, n in enumerate(prompt_lens)]
    sources = [random_ids((n + 1,), VOCAB, seed=seed + 50 + i) for i, n in enumerate(prompt_lens)]
    return session, session.prefill_prompts(prompts, sources if encoder else None)


@CPU_TRITON
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_a_replayed_decode_step_issues_three_ops_outside_its_graph(
        kind: str, request: pytest.FixtureRequest, replays: list) -> None:
    """Steady state: the layout copy, the token copy, the logits clone, and few Python calls;
    a new set of running rows adds its tables' gather and copy once."""
    _, compiled = request.getfixturevalue(kind)
    session, _ = _session(compiled, [3, 3, 3], 12, seed=5)
    assert session.kv_caches is compiled.static_decode.kv_caches
    tokens = random_ids((3,), VOCAB, seed=1)
    session.decode(tokens)
    before = len(replays)
    counts = count_steps(lambda: session.decode(tokens), 2)
    assert len(replays) - before == 4  # each step one whole-step replay (twice two steps)
    assert counts["ops_by_name"] == STEADY_OPS
    assert counts["python_calls"] <= 40  # was ~150 through the forward and the runner
    changed, two = OutsideGraphOps(), tokens[:2]
    with replays_paused(changed), changed:
        session.decode(two, [0, 2])  # EOS compaction: row 1 left
    assert sum(changed.ops.values()) > sum(STEADY_OPS.values())  # the tables, once
    assert count_steps(lambda: session.decode(two, [0, 2]), 1)["ops_by_name"] == STEADY_OPS


@CPU_TRITON
@pytest.mark.slow
def test_the_fast_path_keeps_the_decode_checks(llama: tuple[Any, Any], replays: list) -> None:
    _, compiled = llama
    session, _ = _session(compiled, [2, 2], 1, seed=7)
    tokens = random_ids((2,), VOCAB, seed=2)
    with pytest.raises(ValueError, match=r"expected tokens of shape \(2,\)"):
        session.decode(tokens[:1])
    for rows in ([1, 1], [-1, 0], [0, 2]):
        with pytest.raises(ValueError, match=r"expected distinct rows in \[0, 2\)"):
            session.decode(tokens, rows)
    session.decode(tokens)
    before = len(replays)
    with pytest.raises(RuntimeError, match="expected room left, found sequence 0 at context 3"):
        session.decode(tokens)
    assert len(replays) == before and session.context_lens == [3, 3]


@CPU_TRITON
@pytest.mark.slow
def test_the_next_layout_is_staged_behind_each_replay(llama: tuple[Any, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each replay is followed by the next step's layout (each sequence one position on), so a
    step that brings each sequence one on copies no layout before its replay; a step elsewhere
    (the contexts moved back, as the kernel census does) stages its own first, and its logits
    are what that position gave the first time."""
    from runtime.replay_simulator import SimulatedGraph

    _, compiled = llama
    state = compiled.static_decode
    order: list[str] = []
    upload, replay = state.layout.upload, SimulatedGraph.replay
    monkeypatch.setattr(state.layout, "upload", lambda: (order.append("upload"), upload())[1])
    monkeypatch.setattr(SimulatedGraph, "replay",
                        lambda graph: (order.append("replay"), replay(graph))[1])
    session, _ = _session(compiled, [3, 5], 6, seed=11)
    tokens = random_ids((2,), VOCAB, seed=3)
    first = session.decode(tokens)                              # positions 3 and 5
    bases = session.layout.bases
    assert state.positions[:2].tolist() == [4, 6] and state.seq_lens[:2].tolist() == [5, 7]
    assert state.slot_mapping[:2].tolist() == [bases[0] + 4, bases[1] + 6]
    del order[:]
    session.decode(tokens)                                      # one on: as staged
    assert order == ["replay", "upload"]
    del order[:]
    session.context_lens = [3, 5]                               # back: staged anew
    again = session.decode(tokens)
    assert order == ["upload", "replay", "upload"]
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-5)


# one action of the interleaving: ("decode" | "full" | "chunk", rows) or ("session", lengths)
ROWS = st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True)
ACTION = st.one_of(
    st.tuples(st.sampled_from(["decode", "decode", "full", "chunk"]), ROWS),
    st.tuples(st.just("session"), st.lists(st.integers(1, 4), min_size=1, max_size=4)))


@CPU_TRITON
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "bart"])
@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTION, min_size=3, max_size=7), seed=st.integers(0, 99))
# always: a subset after all rows, the same rows in another order, after a "full" step, and a
# new session of a different layout
@example(actions=[("decode", [1]), ("decode", [1, 0]), ("full", [0]), ("decode", [1]),
                  ("session", [2, 4, 1]), ("decode", [2, 0])], seed=0)
def test_interleaved_steps_never_read_stale_tables(kind: str, request: pytest.FixtureRequest,
                                                   actions: list[tuple[str, list[int]]],
                                                   seed: int) -> None:
    """Decode steps over changing sets of running rows (fast path), the same steps through the
    runner's own whole-step dispatch ("full", which loads its own tables), steps of two tokens
    per row (piecewise or eager) and new sessions, in any order: the logits are eager's."""
    model, compiled = request.getfixturevalue(kind)
    room = 2 * len(actions) + 2
    eager = ours = None
    for step, (action, values) in enumerate([("session", [3, 2])] + actions):
        if action == "session":
            eager = ours = None
            gc.collect()  # the old session releases the runner's caches
            eager, expected = _session(model, values, room, seed + step)
            ours, logits = _session(compiled, values, room, seed + step)
            assert ours.kv_caches is compiled.static_decode.kv_caches
        else:
            expected, logits = _same_step(eager, ours, action, values, seed + step)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def _same_step(eager: Any, ours: Any, action: str, values: list[int], seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one step of both sessions: rows `values` (those in the batch)."""
    rows = [r for r in values if r < eager.batch] or [0]
    tokens = random_ids((len(rows) * (2 if action == "chunk" else 1),), VOCAB, seed)
    if action == "decode":
        return eager.decode(tokens, rows), ours.decode(tokens, rows)
    counts = [2 if action == "chunk" else 1] * len(rows)
    return (eager.step(rows, tokens, counts=counts), ours.step(rows, tokens, counts=counts))


class HostReads(TorchDispatchMode):
    """Counts reads of tensor data on the host outside graph replays: `.item()`, `int()`,
    `bool()` and the like (aten._local_scalar_dense), `.tolist()`, `.cpu()`, `.numpy()`, each of
    which waits for the device on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def counting(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        for name in ("tolist", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        with replays_paused(self), self:
            yield
        monkeypatch.undo()

    def _counted(self, method: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.paused:
                self.reads += 1
            return method(tensor, *args, **kwargs)
        return counted


def _host_reads(compiled: Any, steps: int, monkeypatch: pytest.MonkeyPatch, **options: Any
                ) -> tuple[int, torch.Tensor]:
    prompt = random_ids((3, 3), VOCAB, seed=9)
    counter = HostReads()
    with counter.counting(monkeypatch):
        tokens = generate(compiled, prompt, steps, **options)
    return counter.reads, tokens


@CPU_TRITON
@pytest.mark.slow
def test_generation_reads_nothing_back_per_step_without_eos(
        llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without EOS no step waits for the device (the reads of the prefill are the same for any
    length); with EOS, one batched read a step (each step's flags, read one step late)."""
    model, compiled = llama
    few, _ = _host_reads(compiled, 3, monkeypatch, ignore_eos=True)
    many, free = _host_reads(compiled, 7, monkeypatch, ignore_eos=True)
    assert many == few
    never = sorted(set(range(3, VOCAB)) - set(free.flatten().tolist()))[:1]  # EOS that never fires
    few_eos, _ = _host_reads(compiled, 3, monkeypatch, eos_token_id=never, pad_token_id=0)
    many_eos, tokens = _host_reads(compiled, 7, monkeypatch, eos_token_id=never, pad_token_id=0)
    assert many_eos - few_eos == 7 - 3 and torch.equal(tokens, free)


@pytest.mark.gpu
@pytest.mark.parametrize("eos", [False, True])
def test_cuda_decode_steps_never_synchronize(eos: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU, with real CUDA graphs: every decode step and the work between two steps
    (choosing tokens, EOS flags, compaction) runs under torch's sync debug mode "error"."""
    model = from_hf(build_hf("llama", seed=43, num_key_value_heads=2)).to("cuda")
    compiled = compile_model(model, config=FAST.replace(device="cuda", simulate_capture=False))
    guarded: dict[str, int] = {"calls": 0}

    def no_sync(method: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            guarded["calls"] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    prompt = random_ids((3, 4), VOCAB, seed=3).cuda()
    free = generate(model, prompt, 8, ignore_eos=True)
    options: dict[str, Any] = dict(ignore_eos=True)
    if eos:
        options = dict(eos_token_id=int(free[1, 2]), pad_token_id=0)
    expected = generate(model, prompt, 8, **options)
    monkeypatch.setattr(DecodeSession, "decode", no_sync(DecodeSession.decode))
    monkeypatch.setattr(_GenerationLoop, "_emit", no_sync(_GenerationLoop._emit))
    assert torch.equal(generate(compiled, prompt, 8, **options), expected)
    assert guarded["calls"] > 8
