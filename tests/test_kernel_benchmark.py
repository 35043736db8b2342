"""benchmarks/kernels.py: the tuning it suggests from a sweep (pure), and a CPU smoke run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.kernel_tuning import decode_tuning, gemv_tuning, suggestions


def _attention(batch: int, times: dict[tuple[int, int, int], float], default: float,
               unfused: float, reduce_launch: float | None = None) -> dict[str, Any]:
    """A sweep record; `reduce_launch`: the default (which combines in the kernel) also timed
    with a separate reduce launch, as a record of a split default has it."""
    variants = [{"name": f"s{s}-n{n}-w{w}", "splits": s, "block_n": n, "num_warps": w,
                 "fuse_write": True, "us": us} for (s, n, w), us in times.items()]
    variants += [{"name": "default", "fuse_reduce": True, "us": default},
                 {"name": "default-unfused-write", "us": unfused}]
    if reduce_launch is not None:
        variants.append({"name": "default-other-reduce", "fuse_reduce": False,
                         "us": reduce_launch})
    return {"kernel": "decode_attention", "model": "m", "batch": batch, "context": 256,
            "kv_heads": 8, "head_size": 64, "variants": variants}


def test_decode_tuning_picks_the_blocks_then_the_split_rule() -> None:
    # block 32 wins overall; at batch 1 (8 programs) 8 splits are best, at batch 64 one split
    one = _attention(1, {(1, 32, 4): 9.0, (4, 32, 4): 5.0, (8, 32, 4): 3.0, (16, 32, 4): 4.0,
                         (8, 64, 4): 3.5, (1, 64, 4): 9.5}, default=4.0, unfused=5.0,
                     reduce_launch=4.5)
    many = _attention(64, {(1, 32, 4): 6.0, (2, 32, 4): 7.0, (1, 64, 4): 6.5}, default=6.0,
                      unfused=6.2)
    text = decode_tuning([one, many], processors=16)
    # 16 SMs x 4 per SM / 8 programs = 8 splits at batch 1; 64 / 512 -> 1 split at batch 64
    assert text == ("{64: DecodeTuning(block_n=32, num_warps=4, programs_per_processor=4, "
                    "max_splits=8, fuse_write=True, min_block_g=16, fuse_reduce=True)}")
    # the combine in the kernel is slower: suggested off (only split cases count)
    slower = _attention(1, {(8, 32, 4): 3.0}, default=4.0, unfused=5.0, reduce_launch=3.5)
    assert decode_tuning([slower, many], processors=16).endswith("fuse_reduce=False)}")


def _linear(rows: int, baseline: float, gemv: dict[tuple[int, int, int], float]
            ) -> dict[str, Any]:
    variants = [{"name": f"n{n}-b{b}-w{w}-s3", "block_n": n, "budget": b, "num_warps": w,
                 "num_stages": 3, "us": us} for (n, b, w), us in gemv.items()]
    return {"kernel": "linear", "model": "m", "rows": rows, "out_features": 1024,
            "in_features": 4096, "epilogue": "none", "baseline_us": baseline,
            "variants": variants + [{"name": "default", "us": baseline}]}


def test_gemv_tuning_adopts_up_to_the_last_row_count_that_wins() -> None:
    records = [_linear(1, 10.0, {(4, 4096, 4): 6.0, (8, 4096, 4): 5.0}),
               _linear(4, 10.0, {(4, 4096, 4): 7.0, (8, 4096, 4): 9.0}),
               _linear(8, 10.0, {(4, 4096, 4): 9.9, (8, 4096, 4): 11.0})]  # not 3% faster
    assert gemv_tuning(records) == ("{(1024, 4096, False): GemvTuning(max_rows=4, block_n=4, "
                                    "budget=4096, num_warps=4, num_stages=3)}")  # 6+7 < 5+9
    losing = [_linear(1, 5.0, {(4, 4096, 4): 6.0})]
    assert "max_rows=0" in gemv_tuning(losing)
    assert set(suggestions(records + [{"kernel": "norm", "error": "x"}], 16)) == {"GEMV_TUNING"}


@pytest.mark.slow
def test_cpu_smoke_run_writes_cases_and_suggestions(tmp_path: Path) -> None:
    from benchmarks import kernels

    out = kernels.main(["--device", "cpu", "--kernels", "linear,norm,norm_linear", "--models",
                        "bart-large", "--out", str(tmp_path / "k.json")])
    result = json.loads(out.read_text())
    assert [case["kernel"] for case in result["cases"]] == \
        ["norm"] * 2 + ["norm_linear"] * 4 + ["linear"] * 4
    assert all(set(case["peers_us"]) == {"triton norm, then GEMV"} for case in result["cases"]
               if case["kernel"] == "norm_linear")
    assert all(case["check"]["ok"] for case in result["cases"])
    assert all("us" in variant for case in result["cases"] for variant in case["variants"])
    assert "GEMV_TUNING" in result["suggestions"] and result["skipped"] == []
