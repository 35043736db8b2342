"""Sizing the KV cache from a profiling run: the arithmetic, what a slot costs, what the weights
take, "auto" in the config and the figures in the compile report."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler import CompileConfig, compile_model
from compiler.compiled_model import CompiledModel
from compiler.report import CompileReport
from models import from_hf
from runtime import memory
from runtime import generate
from runtime.kv_cache import allocate_kv_caches
from runtime.memory import DeviceMemoryProfiler
from runtime.replay_simulator import SimulatedGraphDevice
from runtime.runner import BucketRunner
from runtime.static_decode import KVCachePlan
from tests.model_oracle import build_hf, random_ids

GiB, MiB = 2**30, 2**20


@given(total=st.integers(1, 200), used=st.floats(0, 1), activation=st.integers(0, 8 * GiB),
       weights=st.integers(0, 8 * GiB), graphs=st.integers(0, GiB),
       per_token=st.integers(1, 2**20), fraction=st.floats(0.05, 1.0))
def test_the_cache_takes_the_fraction_less_what_the_model_needs_and_never_more_than_is_free(
        total: int, used: float, activation: int, weights: int, graphs: int, per_token: int,
        fraction: float) -> None:
    """The cache, the model's weights, its graphs and the largest step's activations fit in
    `fraction` of the device; the cache and the activations fit in `fraction` of what is free
    (memory other models hold is theirs); and one more token would break one of the two."""
    total_bytes = total * GiB
    free = int(total_bytes * (1 - used))
    profile = memory.MemoryProfile(total_bytes, free, activation, weights, graphs)

    def fits(tokens: int) -> bool:
        cache = tokens * per_token
        return (cache + weights + graphs + activation <= int(total_bytes * fraction)
                and cache <= int((free - activation) * fraction))

    if not fits(1):
        with pytest.raises(ValueError, match="no room for one token.*gpu_memory_utilization"):
            memory.profiled_kv_cache_tokens(profile, per_token, fraction)
        return
    tokens = memory.profiled_kv_cache_tokens(profile, per_token, fraction)
    assert fits(tokens) and not fits(tokens + 1)


def test_a_second_model_gets_a_share_of_what_the_first_left() -> None:
    """vLLM's arithmetic alone (the fraction of the device less this model's own memory) would
    give a second model of one process a cache the first one already holds."""
    alone = memory.MemoryProfile(80 * GiB, 79 * GiB, GiB, GiB)
    second = memory.MemoryProfile(80 * GiB, 9 * GiB, GiB, GiB)
    first_tokens = memory.profiled_kv_cache_tokens(alone, 1024, 0.9)
    second_tokens = memory.profiled_kv_cache_tokens(second, 1024, 0.9)
    assert first_tokens == (int(80 * GiB * 0.9) - 2 * GiB) // 1024  # weights and activations
    assert second_tokens == int((9 - 1) * GiB * 0.9) // 1024  # of what is free, not an error


def test_out_of_range_fractions_are_refused() -> None:
    profile = memory.MemoryProfile(GiB, GiB, 0)
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"gpu_memory_utilization: expected a fraction"):
            memory.profiled_kv_cache_tokens(profile, 64, fraction)


def test_a_plan_profiles_only_for_auto_on_a_device_that_profiles() -> None:
    calls: list[int] = []

    def profile() -> memory.MemoryProfile:
        calls.append(1)
        return memory.MemoryProfile(80 * GiB, 80 * GiB, 0)

    def plan(tokens: int | str) -> KVCachePlan:
        never_built: Any = None  # slots() sizes; build() is the runner's
        return KVCachePlan(tokens, 1024, build=lambda slots: never_built)

    assert plan(123).slots(profile, 0.5) == 123 and not calls
    assert plan("auto").slots(None, 0.5) == memory.CPU_KV_CACHE_TOKENS
    assert plan("auto").slots(profile, 0.5) == 40 * GiB // 1024 and calls == [1]


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_bytes_per_token_is_what_the_runners_cache_takes_per_slot(kind: str) -> None:
    model = from_hf(build_hf(kind, seed=1))
    per_token = memory.kv_cache_bytes_per_token(model.attention_specs(), torch.bfloat16)
    slots = 37
    encoder_slots = slots if kind == "bart" else 0  # a runner's cross cache is as large
    caches = allocate_kv_caches(model.attention_specs(), slots, encoder_slots, torch.bfloat16,
                                "cpu")
    allocated = sum(t.numel() * t.element_size() for c in caches.values()
                    for t in (c.key, c.value) if t is not None)
    assert allocated == slots * per_token > 0


def test_weight_memory_counts_tied_weights_once() -> None:
    model = from_hf(build_hf("bart", seed=2))  # embeddings and LM head share one weight
    assert model.lm_head.weight is model.model.shared.weight
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    named = sum(p.numel() * p.element_size()
                for _, p in model.named_parameters(remove_duplicate=False))
    assert memory.weight_memory_bytes(model) == sum(unique.values()) < named


def test_config_takes_auto_or_a_count_and_a_fraction() -> None:
    assert CompileConfig().kv_cache_tokens == "auto"
    assert CompileConfig().gpu_memory_utilization == 0.9
    for bad in ("big", -1, True, 2.5):
        with pytest.raises(ValueError, match="kv_cache_tokens: expected 'auto' or an integer"):
            CompileConfig(kv_cache_tokens=bad)
    with pytest.raises(ValueError, match="gpu_memory_utilization: expected a fraction"):
        CompileConfig(gpu_memory_utilization=1.2)
    env = {"FXKILN_KV_CACHE_TOKENS": "auto", "FXKILN_GPU_MEMORY_UTILIZATION": "0.5"}
    assert CompileConfig.from_env(env) == CompileConfig(gpu_memory_utilization=0.5)
    assert CompileConfig.from_env({"FXKILN_KV_CACHE_TOKENS": "64"}).kv_cache_tokens == 64
    assert CompileConfig(gpu_memory_utilization=0.5).hash() != CompileConfig().hash()


def test_report_and_log_give_weights_graphs_and_cache(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="models"):
        model = from_hf(build_hf("llama", seed=3))
    assert any("Loading model weights took" in r.getMessage() for r in caplog.records)
    config = CompileConfig(device="cpu", capture_sizes=(1, 2), simulate_capture=True,
                           prefill_capture_sizes=())
    report = compile_model(model, config=config).report
    per_token = memory.kv_cache_bytes_per_token(model.attention_specs(), model.dtype)
    assert report.weight_memory_bytes == memory.weight_memory_bytes(model) > 0
    assert report.kv_cache_tokens == memory.CPU_KV_CACHE_TOKENS
    assert report.kv_cache_bytes == memory.CPU_KV_CACHE_TOKENS * per_token
    assert f"KV cache {memory.CPU_KV_CACHE_TOKENS} tokens" in str(report)


@pytest.mark.gpu
def test_profile_peak_sees_what_the_forward_allocated_on_cuda() -> None:
    device = torch.device("cuda")
    idle = memory.profile_peak(lambda: None, device)
    busy = memory.profile_peak(lambda: torch.empty(512 * 2**20, dtype=torch.uint8,
                                                   device=device), device)
    assert busy.total_bytes == idle.total_bytes == torch.cuda.mem_get_info(device)[1]
    assert busy.activation_bytes - idle.activation_bytes >= 500 * 2**20
    assert 0 < busy.free_bytes <= busy.total_bytes


@pytest.mark.gpu
def test_auto_on_cuda_fills_the_fraction_and_a_second_model_gets_what_is_left() -> None:
    model = from_hf(build_hf("llama", seed=4)).to("cuda")
    total = torch.cuda.mem_get_info()[1]
    first = compile_model(model, config=CompileConfig(device="cuda"))
    report = first.report
    per_token = memory.kv_cache_bytes_per_token(model.attention_specs(), model.dtype)
    assert report.kv_cache_bytes == report.kv_cache_tokens * per_token
    assert report.kv_cache_bytes + report.graph_memory_bytes <= 0.9 * total
    assert report.kv_cache_bytes > 0.5 * total  # a tiny model: the cache takes nearly all
    second = compile_model(model, config=CompileConfig(device="cuda"))
    assert 0 < second.report.kv_cache_bytes < 0.1 * total
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), device="cuda")
    expected = generate(model, prompt, 4, ignore_eos=True)
    assert torch.equal(generate(first, prompt, 4, ignore_eos=True), expected)
    assert torch.equal(generate(second, prompt, 4, ignore_eos=True), expected)


class FixedProfiler(DeviceMemoryProfiler):
    """Says every measured block kept `consumed` bytes (CPU resident memory is too noisy)."""

    def __init__(self, consumed: int) -> None:
        super().__init__("cpu")
        self._consumed = consumed

    @property
    def consumed_bytes(self) -> int:
        return self._consumed


class ProfilingSimulator(SimulatedGraphDevice):
    """The replay simulator on the CPU, sizing "auto" caches from a made-up profile, and
    recording the order of captures and of the profiling forward (with its logits' rows)."""

    profiles_memory = True

    def __init__(self, profile: memory.MemoryProfile, graph_bytes: int) -> None:
        super().__init__("cpu")
        self.profile, self.graph_bytes = profile, graph_bytes
        self.events: list[Any] = []

    def memory_profiler(self) -> DeviceMemoryProfiler:
        return FixedProfiler(self.graph_bytes)

    def capture_graph(self, run: Any, args: Any, *, key: Any, **options: Any) -> Any:
        self.events.append(key)
        return super().capture_graph(run, args, key=key, **options)

    def profile_forward(self, run: Any) -> memory.MemoryProfile:
        self.events.append(("profile", run().shape[0]))
        return self.profile


def _sized_runner(profile: memory.MemoryProfile, fraction: float
                  ) -> tuple[Any, BucketRunner, ProfilingSimulator]:
    model = from_hf(build_hf("llama", seed=5))
    rewritten = compile_model(model, config=CompileConfig(
        device="cpu", capture_sizes=(), kernels={"attention": "triton"})).graph_module
    spec = model.capture_spec(2, "auto")
    device = ProfilingSimulator(profile, graph_bytes=2 * MiB)
    runner = BucketRunner(rewritten, spec.example_inputs, graph_device=device,
                          capture_sizes=(1, 2), token_input_indices=spec.token_input_indices,
                          step_context=spec.step_context, kv_cache=spec.kv_cache,
                          memory_utilization=fraction)
    return model, runner, device


@pytest.mark.slow  # Triton attention, interpreted, in the whole-step captures
def test_the_runner_sizes_its_cache_after_the_piecewise_graphs_from_the_largest_step(
        caplog: pytest.LogCaptureFixture) -> None:
    profile = memory.MemoryProfile(total_bytes=64 * MiB, free_bytes=40 * MiB,
                                   activation_bytes=MiB)
    model, runner, device = _sized_runner(profile, fraction=0.5)
    with caplog.at_level(logging.INFO, logger="runtime"):
        stats = runner.capture()
    weights = memory.weight_memory_bytes(runner.split.split_module)
    per_token = memory.kv_cache_bytes_per_token(model.attention_specs(), model.dtype)
    own = weights + 2 * MiB + MiB  # weights, the piecewise graphs, the activations
    expected = min(32 * MiB - own, int(39 * MiB * 0.5)) // per_token
    assert runner.static_decode is not None and runner.static_decode.num_slots == expected
    assert stats.kv_cache_tokens == expected
    assert stats.kv_cache_bytes == expected * per_token
    assert stats.graph_memory_bytes == 2 * 2 * MiB  # the piecewise and the whole-step graphs
    profiled = device.events.index(("profile", 2))  # at the largest bucket: 2 rows of logits
    assert all(isinstance(key, int) for key in device.events[:profiled])
    assert device.events[profiled + 1:] == [("whole", 2), ("whole", 1)]
    assert stats.decode_graph_sizes == (1, 2)
    assert any(f"runner KV cache: {expected} tokens" in r.getMessage() for r in caplog.records)
    assert any("KV cache:" in r.getMessage() and "graphs 0.00 GiB" in r.getMessage()
               for r in caplog.records if r.name == "runtime.memory")
    compiled = CompiledModel(runner, CompileReport(), CompileConfig(), runner.split.split_module,
                             model)
    prompt = random_ids((2, 3), model.config.vocab_size, seed=5)
    assert torch.equal(generate(compiled, prompt, 4, ignore_eos=True),
                       generate(model, prompt, 4, ignore_eos=True))


def test_a_device_without_room_fails_at_capture_before_any_generation() -> None:
    profile = memory.MemoryProfile(total_bytes=64 * MiB, free_bytes=MiB, activation_bytes=MiB)
    _, runner, _ = _sized_runner(profile, fraction=0.9)
    with pytest.raises(ValueError, match="KV cache: no room for one token"):
        runner.capture()
