"""The decode benchmark's kernel census: per-step figures from device events, and on CUDA the
census of a real compiled decode step."""
from __future__ import annotations

import pytest
import torch

from benchmarks.kernel_census import (busy_us, category, kernel_census, session_census,
                                      summarize)

EVENTS = [  # two steps of a made-up decode step: (kernel name, microseconds)
    ("sm90_xmma_gemm_bf16bf16_bf16f32", 10.0), ("norm_rows_kernel", 2.0),
    ("grouped_decode_attention_kernel", 4.0), ("Memcpy HtoD (Pinned -> Device)", 1.0),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", 12.0), ("norm_rows_kernel", 2.0),
    ("grouped_decode_attention_kernel", 6.0), ("Memset (Device)", 0.5), ("write_kv_kernel", 1.0),
]


def test_summarize_averages_per_step_and_keeps_copies_apart() -> None:
    census = summarize(EVENTS, steps=2)
    assert census["kernels_per_step"] == 3.5  # 7 compute kernels over 2 steps
    assert census["kernel_ms_per_step"] == pytest.approx(37.0 / 2 / 1e3)
    assert census["copies_per_step"] == 1.0
    assert census["copy_ms_per_step"] == pytest.approx(1.5 / 2 / 1e3)
    assert census["category_ms_per_step"] == pytest.approx(
        {"gemm": 0.011, "norm": 0.002, "attention": 0.005, "other": 0.0005})
    top = census["top_kernels"]
    assert [kernel["category"] for kernel in top] == ["gemm", "attention", "norm", "other"]
    assert top[0]["calls_per_step"] == 1.0 and top[0]["us_per_step"] == 11.0


def test_busy_time_counts_overlapping_kernels_once() -> None:
    # a kernel launched as a dependent starts (and waits) before the one before it ends
    assert busy_us([(0.0, 10.0), (8.0, 12.0), (20.0, 21.0), (20.5, 20.7)]) == pytest.approx(13.0)
    assert busy_us([(5.0, 6.0), (0.0, 2.0)]) == pytest.approx(3.0)   # in any order
    assert busy_us([]) == 0.0


def test_categories_and_bad_step_counts() -> None:
    assert category("ampere_bf16_s16816gemm_bf16_128x64") == "gemm"
    assert category("triton_red_fused_add_native_layer_norm_0") == "norm"
    assert category("rotary_kernel") == "rotary"
    assert category("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, "
                    "at::native::ArgMaxOps") == "sampling"
    assert category("argmax_blocks_kernel") == "sampling"
    assert category("some_unknown_kernel") == "other"
    with pytest.raises(ValueError, match="steps >= 1"):
        summarize(EVENTS, steps=0)


def test_no_census_off_cuda() -> None:
    calls = []
    assert kernel_census(lambda: calls.append(1), torch.device("cpu")) is None
    assert calls == []  # nothing ran


@pytest.mark.gpu
def test_census_of_a_compiled_decode_step_on_gpu() -> None:
    from compiler import CompileConfig, compile_model
    from models import from_hf
    from runtime.generation import DecodeSession
    from tests.model_oracle import build_hf

    device = torch.device("cuda")
    model = from_hf(build_hf("llama", seed=3).to(device))
    compiled = compile_model(model, config=CompileConfig(capture_sizes=(1, 2), kv_cache_tokens=64))
    session = DecodeSession(compiled, 2, 4, 9, None, device)
    tokens = session.prefill(torch.randint(3, 100, (2, 4), device=device))[:, -1].argmax(-1)
    for _ in range(6):
        tokens = session.decode(tokens).argmax(-1)
    census = session_census(session, tokens, device, steps=3)
    assert census is not None and census["census_steps"] == 3
    assert census["kernels_per_step"] >= 10 and census["kernel_ms_per_step"] > 0
    assert 0 < census["busy_ms_per_step"] <= census["kernel_ms_per_step"] * (1 + 1e-9)
    assert census["category_ms_per_step"].get("attention", 0) > 0
    assert session.context_lens == [10, 10]  # rewound by 3, then three steps
