"""The signature runner on CPU, through the replay simulator: graphs from Dynamo captured per
input signature, static inputs read in place, copied inputs staged and written back, outputs
safe from later replays; and the simulator catches a runner that forgets either."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

from runtime import signature_runner as signature_module
from runtime.graph_device import CaptureOptions
from runtime.piece_runner import PieceCaptureError, StaticInputError
from runtime.replay_simulator import SimulatedGraph, SimulatedGraphDevice
from runtime.signature_inputs import GraphInputs, StagedInputs
from runtime.signature_runner import CHANGING, SignatureRunner
from tests.signature_models import SIZES, FreshRunners, ToyCaller, ToyStep

BATCHES = (1, 2, 3, 5)  # 1: a graph of static shapes (whole); 2, 3, 5: one dynamic graph


@pytest.fixture(scope="module")
def toy() -> Iterator[tuple[ToyStep, Any, FreshRunners]]:
    """The toy compiled once; Dynamo settles on its graphs while warming up every batch."""
    torch._dynamo.reset()
    model, backend = ToyStep().eval(), FreshRunners()
    optimized = torch.compile(model, backend=backend)
    caller = ToyCaller(model, optimized)
    for batch in BATCHES * 2:
        caller.call(batch)
    yield model, optimized, backend
    torch._dynamo.reset()


def _runner_for(runners: list[SignatureRunner], whole: bool) -> SignatureRunner:
    (runner,) = [r for r in runners if r.whole == whole]
    return runner


def test_the_toy_has_a_whole_graph_and_a_piecewise_one(toy: Any) -> None:
    _, _, backend = toy
    runners = backend.fresh()
    assert sorted(r.whole for r in runners) == [False, True]
    piecewise = _runner_for(runners, whole=False)
    assert piecewise.stats.pieces == 3 and sum(p.piece.is_splitting
                                               for p in piecewise.piece_runners) == 1


@given(calls=st.lists(st.tuples(st.sampled_from(BATCHES), st.booleans()), min_size=1,
                      max_size=10))
def test_property_any_call_sequence_equals_eager(toy: Any, calls: list[tuple[int, bool]]) -> None:
    """Random sequences of signatures, caches that stay put or move, in-place writes to static
    and copied inputs: outputs and the caller's state equal eager's after every call, and no
    output a caller holds changes in later calls."""
    model, optimized, backend = toy
    backend.fresh(debug=True)
    caller = ToyCaller(model, optimized)
    for seed, (batch, new_cache) in enumerate(calls):
        caller.call(batch, new_cache, seed)
    caller.check_held()


def test_a_repeated_signature_replays_from_its_third_call(toy: Any, replays: list) -> None:
    model, optimized, backend = toy
    runners = backend.fresh()
    caller = ToyCaller(model, optimized)
    for seed in range(5):
        caller.call(1, seed=seed)  # eager and watched, captured, then three replays
    assert len(replays) == 3
    whole = _runner_for(runners, whole=True)
    assert whole.stats.captured_sizes == (1,) and whole.stats.note == ""
    assert whole.stats.captured_signatures == ("size 1: copied (1, 8) (1, 8), "
                                               "2 read in place",)
    pieces = _runner_for(runners, whole=False)
    for seed in range(4):
        caller.call(3, seed=seed)
    captured = sum(p.piece.captured for p in pieces.piece_runners)
    assert len(replays) == 3 + 2 * captured  # the pieces' graphs, SDPA eagerly between them
    caller.check_held()


def test_a_moved_static_input_drops_the_graph_and_captures_again(toy: Any,
                                                                 replays: list) -> None:
    model, optimized, backend = toy
    whole = _runner_for(backend.fresh(), whole=True)
    caller = ToyCaller(model, optimized)
    for seed in range(3):
        caller.call(1, seed=seed)
    caller.call(1, new_cache=True, seed=3)  # the next generation's cache: dropped, watched
    for seed in range(4, 7):
        caller.call(1, seed=seed)           # captured again, then replayed
    assert len(replays) == 1 + 2
    assert whole.stats.captured_sizes == (1,)


def test_a_cache_that_moves_every_call_is_copied_in_and_back(toy: Any, replays: list) -> None:
    model, optimized, backend = toy
    whole = _runner_for(backend.fresh(), whole=True)
    caller = ToyCaller(model, optimized)
    for seed in range(5):
        caller.call(1, new_cache=True, seed=seed)  # ToyCaller checks the caller's cache each call
    assert len(replays) == 3
    (entry,) = whole.entries.values()
    assert len(entry.staged.copy_back) == 3 and not entry.staged.checked  # cache, step, scratch


def test_sizes_past_the_largest_capture_size_run_uncaptured(toy: Any, replays: list) -> None:
    model, optimized, backend = toy
    runners = backend.fresh()
    caller = ToyCaller(model, optimized)
    for seed in range(4):
        caller.call(SIZES[-1] + 1, seed=seed)
    assert replays == []
    note = _runner_for(runners, whole=False).stats.note
    assert note == f"leading size {SIZES[-1] + 1} is more than the largest capture size {SIZES[-1]}"


def test_shapes_that_change_every_call_say_so(toy: Any) -> None:
    model, optimized, backend = toy
    pieces = _runner_for(backend.fresh(), whole=False)
    caller = ToyCaller(model, optimized)
    for batch in (2, 3, 2, 3):
        caller.call(batch)
    assert pieces.stats.captured_sizes == () and pieces.stats.note == CHANGING


@pytest.mark.parametrize("mutant", ["no staging", "no clone"])
def test_the_simulator_catches_a_runner_that_skips_staging_or_cloning(
        toy: Any, monkeypatch: pytest.MonkeyPatch, mutant: str) -> None:
    """A replay that reads stale buffers, or hands out graph memory, fails the checks above."""
    model, optimized, backend = toy
    backend.fresh()
    if mutant == "no staging":
        monkeypatch.setattr(StagedInputs, "load", lambda self, args, force=False: None)
    else:
        monkeypatch.setattr(signature_module, "_finish", lambda outputs, clone: outputs)
    caller = ToyCaller(model, optimized)
    with pytest.raises(AssertionError):
        for seed in range(5):
            caller.call(1, seed=seed)
        caller.check_held()


def _traced_runner(function: Any, capture_failure: str = "raise") -> SignatureRunner:
    """A signature runner over a traced one-input graph of static shapes."""
    return SignatureRunner(fx.symbolic_trace(function),
                           GraphInputs(frozenset(), static_shapes=True), [torch.randn(2, 3)],
                           graph_device=SimulatedGraphDevice("cpu"), capture_sizes=SIZES,
                           options=CaptureOptions(capture_failure=capture_failure))


def _item_runner(capture_failure: str) -> SignatureRunner:
    return _traced_runner(lambda x: x * x.abs().max().item(), capture_failure)  # a host sync


def test_grad_mode_runs_uncaptured(replays: list) -> None:
    runner = _traced_runner(lambda x: x * 2)
    x = torch.randn(2, 3, requires_grad=True)
    with torch.enable_grad():
        for _ in range(3):
            assert runner(x).requires_grad
    assert replays == [] and "grad mode" in runner.stats.note
    with torch.no_grad():
        for _ in range(3):
            runner(x)
    assert len(replays) == 1


def test_a_graph_that_cannot_be_captured_raises_or_runs_uncaptured(
        caplog: pytest.LogCaptureFixture, replays: list) -> None:
    x = torch.randn(2, 3)
    raising = _item_runner("raise")
    with torch.no_grad():
        raising(x)
        with pytest.raises(PieceCaptureError, match="capture_failure='eager'"):
            raising(x)
    eager = _item_runner("eager")
    with caplog.at_level(logging.WARNING, logger="runtime.signature_runner"), torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(eager(x), x * x.abs().max())
    assert len(caplog.records) == 1 and "at node %item" in caplog.records[0].message
    assert replays == [] and eager.stats.note.startswith("capture failed")


def test_a_simulated_graph_replays_on_its_capture_arguments() -> None:
    """The simulator reads what it captured (as a CUDA graph does), not what is passed now."""
    x = torch.ones(2, 3)
    runner = _item_runner("raise")
    graph, _ = runner.graph_device.capture_graph(lambda t: t * 2, [x], key=(), keep_outputs=True)
    assert isinstance(graph, SimulatedGraph)
    x.fill_(3.0)
    graph.replay()
    assert graph.outputs.tolist() == [[6.0] * 3] * 2


def _accumulate(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    total.add_(x)
    return total * 2


def test_an_input_whose_address_keeps_changing_is_copied_after_churn(replays: list) -> None:
    """Two totals used in turns, two calls each: each graph that reads one in place is dropped
    at once; after MAX_CHURN such drops the signature copies it (and writes it back)."""
    runner = SignatureRunner(fx.symbolic_trace(_accumulate),
                             GraphInputs(frozenset(), static_shapes=True),
                             [torch.randn(3), torch.zeros(3)],
                             graph_device=SimulatedGraphDevice("cpu"), capture_sizes=SIZES)
    totals, expected = [torch.zeros(3), torch.zeros(3)], [torch.zeros(3), torch.zeros(3)]
    with torch.no_grad():
        for call in range(2 * signature_module.MAX_CHURN + 6):
            which = (call // 2) % 2 if call < 2 * signature_module.MAX_CHURN + 2 else call % 2
            x = torch.randn(3)
            expected[which] += x
            torch.testing.assert_close(runner(x, totals[which]), expected[which] * 2)
            torch.testing.assert_close(totals[which], expected[which])
    (entry,) = runner.entries.values()
    assert entry.staged.checked == () and [i for i, _ in entry.staged.copy_back] == [1]
    assert len(replays) == 4  # the last four calls replay, whichever total they bring


@pytest.mark.parametrize("debug", [True, False])
def test_a_moved_weight_is_an_error_in_debug_mode_and_unseen_without(debug: bool) -> None:
    weight = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    runner = SignatureRunner(fx.symbolic_trace(lambda x, w: x * w),
                             GraphInputs(frozenset({1}), static_shapes=True),
                             [torch.randn(3), weight], graph_device=SimulatedGraphDevice("cpu"),
                             capture_sizes=SIZES, options=CaptureOptions(debug=debug))
    x = torch.randn(3)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(runner(x, weight), x * weight)
        replaced = torch.nn.Parameter(weight + 1, requires_grad=False)
        if debug:
            with pytest.raises(StaticInputError, match="'w'.*expected the same tensor"):
                runner(x, replaced)
        else:  # as a CUDA graph would: the weight it was captured with
            torch.testing.assert_close(runner(x, replaced), x * weight)


def test_host_tensors_of_a_device_graph_are_read_through_device_mirrors() -> None:
    """A CPU tensor a CUDA graph reads (a StaticCache's counter set up inside a compiled
    prefill) cannot be read in place: its copy to the device would sync inside the capture.
    The graph reads a device copy, loaded before each replay and, when the graph writes it,
    copied back after. ("meta" stands in for the device: no data moves, devices do.)"""
    from runtime.signature_inputs import InputPlan, stage

    counter, ids = torch.zeros((), dtype=torch.long), torch.zeros(3, dtype=torch.long)
    inputs = GraphInputs(declared_static=frozenset(), mirrored=frozenset({0}),
                         device=torch.device("meta"))
    plan = InputPlan(inputs, [counter, ids])
    seen = plan.observation((), [counter, ids], [counter._version - 1, ids._version])
    later = [counter, ids.clone()]  # the next call's ids: a new tensor, copied
    assert 0 in seen.written and plan.in_place(later, seen) == frozenset()
    staged = stage(plan, later, plan.in_place(later, seen), seen.written)
    assert staged.args[0].device.type == "meta" and staged.args[1].device.type == "cpu"
    assert [i for i, _ in staged.copy_into] == [1] and staged.copy_back == ()
    (mirror,) = staged.mirrors
    assert mirror.index == 0 and mirror.written and mirror.buffer is staged.args[0]


def test_a_mirror_is_loaded_only_when_its_host_value_changed() -> None:
    """Compared by value with a host shadow: a write that bumps no version counter (through
    numpy) is seen as well; `force` (after a warm-up wrote the buffer) always copies."""
    from runtime.signature_inputs import Mirror

    counter = torch.zeros((), dtype=torch.long)
    mirror = Mirror(0, counter, torch.device("cpu"), written=False)
    assert not mirror.load(counter)
    counter.add_(2)
    assert mirror.load(counter) and mirror.buffer.item() == 2 and not mirror.load(counter)
    counter.numpy()[...] = 7  # no version bump
    assert mirror.load(counter) and mirror.buffer.item() == 7
    mirror.buffer.fill_(0)
    assert not mirror.load(counter) and mirror.load(counter, force=True)
    assert mirror.buffer.item() == 7


def _count(x: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    counter.add_(1)
    return x * counter


def test_a_mirror_the_graph_advances_is_stored_back_and_not_loaded_again(
        replays: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.signature_inputs import Mirror

    loads: list[bool] = []
    load = Mirror.load
    monkeypatch.setattr(Mirror, "load", lambda self, value, force=False: loads.append(
        load(self, value, force)) or loads[-1])
    counter = torch.zeros((), dtype=torch.long)
    inputs = GraphInputs(frozenset(), static_shapes=True, mirrored=frozenset({1}),
                         device=torch.device("cpu"))
    runner = SignatureRunner(fx.symbolic_trace(_count), inputs, [torch.randn(3), counter],
                             graph_device=SimulatedGraphDevice("cpu"), capture_sizes=SIZES)
    with torch.no_grad():
        for step in range(1, 7):
            x = torch.randn(3)
            torch.testing.assert_close(runner(x, counter), x * step)
            assert counter.item() == step
        counter.fill_(10)  # the caller resets it: the next replay loads it
        x = torch.randn(3)
        torch.testing.assert_close(runner(x, counter), x * 11)
    assert len(replays) == 5
    assert loads[-5:] == [False, False, False, False, True]  # the four replays, then the reset


def _add_memory(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    return x + memory


def test_a_tensor_the_caller_keeps_passing_is_read_in_place_and_a_lookalike_is_copied(
        replays: list) -> None:
    """The very tensor at the watched call and the capture (cross-attention keys) is read in
    place: the caller's later in-place writes are seen, a new tensor in its place recaptures.
    Two tensor objects at one address (a fresh tensor in its predecessor's block) are copied."""
    runner = SignatureRunner(fx.symbolic_trace(_add_memory),
                             GraphInputs(frozenset(), static_shapes=True),
                             [torch.randn(3), torch.zeros(3)],
                             graph_device=SimulatedGraphDevice("cpu"), capture_sizes=SIZES)
    memory = torch.randn(3)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3)
            torch.testing.assert_close(runner(x, memory), x + memory)
        (entry,) = runner.entries.values()
        assert [i for i, _ in entry.staged.checked] == [1]
        assert [i for i, _ in entry.staged.copy_into] == [0]
        memory.mul_(3)
        x = torch.randn(3)
        torch.testing.assert_close(runner(x, memory), x + memory)
        assert len(replays) == 2
        other = torch.randn(3)
        for _ in range(3):
            x = torch.randn(3)
            torch.testing.assert_close(runner(x, other), x + other)
        base = torch.randn(3)
        runner = SignatureRunner(fx.symbolic_trace(_add_memory),
                                 GraphInputs(frozenset(), static_shapes=True),
                                 [torch.randn(3), base], graph_device=SimulatedGraphDevice("cpu"),
                                 capture_sizes=SIZES)
        for _ in range(3):
            x, lookalike = torch.randn(3), base.view(3)  # a new object at the same address
            torch.testing.assert_close(runner(x, lookalike), x + base)
        (entry,) = runner.entries.values()
        assert entry.staged.checked == () and [i for i, _ in entry.staged.copy_into] == [0, 1]


def test_a_moved_static_address_tensor_is_captured_again(replays: list) -> None:
    """A declared static tensor that is no parameter (a mark_static_address cache: Hugging
    Face's StaticCache, which `generate` makes anew per call) is checked at every replay: a
    new one drops the graph, which would otherwise keep accumulating into the old one."""
    runner = SignatureRunner(fx.symbolic_trace(_accumulate),
                             GraphInputs(frozenset({1}), static_shapes=True),
                             [torch.randn(3), torch.zeros(3)],
                             graph_device=SimulatedGraphDevice("cpu"), capture_sizes=SIZES)
    with torch.no_grad():
        for total in (torch.zeros(3), torch.zeros(3)):  # the first stays alive: a new address
            expected = torch.zeros(3)
            for _ in range(4):
                x = torch.randn(3)
                expected += x
                torch.testing.assert_close(runner(x, total), expected * 2)
            torch.testing.assert_close(total, expected)
    assert len(replays) == 2 * 2  # per total: watched, captured, two replays


def _count_a_copy(x: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    advanced = counter.contiguous()  # a copy of a strided host tensor, a view of its mirror
    advanced.add_(1)
    return x * advanced.sum()


def test_a_mirror_the_graph_writes_through_a_view_is_loaded_before_every_replay(
        replays: list) -> None:
    """The call never writes the host tensor, but the graph writes its device copy: on CUDA,
    `counter.to(device)` of a StaticCache's host counter copies in eager and is the mirror
    itself in the graph, so `add_` advanced the mirror at every replay (a compiled prefill
    wrote its cache past the end: a device-side assert on the H200). Here `.contiguous()` of a
    strided host tensor plays that part."""
    counter = torch.zeros(4)[::2]   # (2,), stride 2: its mirror is contiguous
    inputs = GraphInputs(frozenset(), static_shapes=True, mirrored=frozenset({1}),
                         device=torch.device("cpu"))
    runner = SignatureRunner(fx.symbolic_trace(_count_a_copy), inputs,
                             [torch.randn(3), counter],
                             graph_device=SimulatedGraphDevice("cpu"), capture_sizes=SIZES)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(3)
            torch.testing.assert_close(runner(x, counter), x * 2)
    assert len(replays) == 3 and not torch.any(counter)
