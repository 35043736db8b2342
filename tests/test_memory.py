"""Sizing the KV cache from a profiling run: the arithmetic, what a slot costs, what the weights
take, "auto" in the config and the figures in the compile report."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import memory
from runtime.kv_cache import allocate_kv_caches
from tests.model_oracle import build_hf

GiB = 2**30


@given(total=st.integers(1, 200), peak=st.integers(0, 200), graphs=st.integers(0, 20),
       per_token=st.integers(1, 2**20), fraction=st.floats(0.05, 1.0))
def test_the_cache_fills_what_the_fraction_leaves_after_the_peak_and_the_graphs(
        total: int, peak: int, graphs: int, per_token: int, fraction: float) -> None:
    profile = memory.MemoryProfile(total * GiB, peak * GiB // 2, graphs * GiB // 8)
    left = int(profile.total_bytes * fraction) - profile.peak_bytes - profile.graph_bytes
    if left < per_token:
        with pytest.raises(ValueError, match="no room for one token.*gpu_memory_utilization"):
            memory.profiled_kv_cache_tokens(profile, per_token, fraction)
        return
    tokens = memory.profiled_kv_cache_tokens(profile, per_token, fraction)
    assert tokens * per_token <= left < (tokens + 1) * per_token


def test_out_of_range_fractions_are_refused() -> None:
    profile = memory.MemoryProfile(GiB, 0)
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"gpu_memory_utilization: expected a fraction"):
            memory.profiled_kv_cache_tokens(profile, 64, fraction)


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


def test_auto_is_a_fixed_size_on_cpu_and_profiled_on_cuda() -> None:
    profile = memory.MemoryProfile(80 * GiB, 10 * GiB, GiB)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory.resolve_kv_cache_tokens(123, cuda, profile, 1024, 0.9) == 123
    assert memory.resolve_kv_cache_tokens("auto", cpu, profile, 1024, 0.9) == \
        memory.CPU_KV_CACHE_TOKENS
    assert memory.resolve_kv_cache_tokens("auto", cuda, None, 1024, 0.9) == \
        memory.UNPROFILED_KV_CACHE_TOKENS
    assert memory.resolve_kv_cache_tokens("auto", cuda, profile, 1024, 0.5) == \
        (40 - 10 - 1) * GiB // 1024


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
    config = CompileConfig(device="cpu", capture_sizes=(1, 2), simulate_capture=True)
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
    assert busy.peak_bytes - idle.peak_bytes >= 500 * 2**20
