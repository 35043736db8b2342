"""What a sweep of `benchmarks/kernels.py` suggests for the code's tuning tables (pure: records
in, Python literals out), so that the sweep's numbers go into the code as they are:

- `DECODE_TUNING` (runtime/kernels/decode_attention.py), per head size: the (block_n, warps)
  pair with the least total time over the cases (each at its best split count), then the
  programs-per-SM and split cap for which `decode_plan`'s rule picks the fastest split counts,
  whether the fused cache write beats a separate one, and whether unpadded query groups beat
  groups padded to 16 rows, and whether split launches combine in the kernel (the last split
  program, `fuse_reduce`) faster than in a second, reduce launch (over the cases that split);
- `GEMV_TUNING` (runtime/kernels/triton_linear.py), per projection shape: the largest swept row
  count up to which the GEMV beats cuBLAS plus the activation's kernel by 3% at every swept row
  count (a row count between two swept ones is taken to win when both do), and the parameters
  with the least total time over those rows (max_rows 0: cuBLAS);
- the best warps of the norm and rotary kernels per shape, for `_warps_for`.
"""
from __future__ import annotations

import collections
from typing import Any

WIN = 0.97  # a GEMV must take at most this fraction of cuBLAS's time to be adopted


def suggestions(records: list[dict[str, Any]], processors: int) -> dict[str, str]:
    usable = [r for r in records if "error" not in r and r.get("variants")]
    found: dict[str, str] = {}
    attention = [r for r in usable if r["kernel"] == "decode_attention"]
    if attention:
        found["DECODE_TUNING"] = decode_tuning(attention, processors)
    linear = [r for r in usable if r["kernel"] == "linear"]
    if linear:
        found["GEMV_TUNING"] = gemv_tuning(linear)
    for kernel in ("norm", "rotary"):
        rows = [r for r in usable if r["kernel"] == kernel and r.get("best")]
        if rows:
            found[f"{kernel} best num_warps"] = str({
                f"{r['model']} rows {r['rows']}": r["best"]["num_warps"] for r in rows})
    return found


def _timed(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in record["variants"] if "us" in v]


def _swept(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in _timed(record) if v["name"].startswith("s")]


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def decode_tuning(records: list[dict[str, Any]], processors: int) -> str:
    entries = []
    by_head: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in records:
        by_head[record["head_size"]].append(record)
    for head_size, group in sorted(by_head.items()):
        pairs = {(v["block_n"], v["num_warps"]) for r in group for v in _swept(r)}

        def total(pair: tuple[int, int]) -> float:
            times = [min((v["us"] for v in _swept(r) if (v["block_n"], v["num_warps"]) == pair),
                         default=float("inf")) for r in group]
            return sum(times)

        if not pairs:
            continue
        block_n, num_warps = min(sorted(pairs), key=total)
        rules = [(per_sm, cap) for per_sm in (1, 2, 4, 8) for cap in (8, 16, 32, 64)]

        def rule_total(rule: tuple[int, int]) -> float:
            per_sm, cap = rule
            spent = 0.0
            for r in group:
                splits = _pow2_floor(min(processors * per_sm // (r["batch"] * r["kv_heads"]), cap))
                candidates = [v for v in _swept(r) if (v["block_n"], v["num_warps"]) ==
                              (block_n, num_warps) and v["splits"] <= splits]
                spent += max(candidates, key=lambda v: v["splits"])["us"] if candidates \
                    else float("inf")
            return spent

        per_sm, cap = min(rules, key=rule_total)
        fused = sum(_named(r, "default") for r in group)
        unfused = sum(_named(r, "default-unfused-write") for r in group)
        narrow = sum(_named(r, "default-narrow-group") for r in group)
        split = [r for r in group if _named(r, "default-other-reduce") < float("inf")]
        one_launch = sum(_reduce_form(r, True) for r in split)
        entries.append(f"{head_size}: DecodeTuning(block_n={block_n}, num_warps={num_warps}, "
                       f"programs_per_processor={per_sm}, max_splits={cap}, "
                       f"fuse_write={fused <= unfused}, min_block_g={1 if narrow < fused else 16}"
                       f", fuse_reduce={one_launch <= sum(_reduce_form(r, False) for r in split)})")
    return "{" + ", ".join(entries) + "}"


def _reduce_form(record: dict[str, Any], fused: bool) -> float:
    """The time of the default plan with the combine in the kernel (`fused`) or in a reduce."""
    return next((v["us"] for v in _timed(record) if v["name"] in (
        "default", "default-other-reduce") and v.get("fuse_reduce") == fused), float("inf"))


def _named(record: dict[str, Any], name: str) -> float:
    return next((v["us"] for v in _timed(record) if v["name"] == name), float("inf"))


def gemv_tuning(records: list[dict[str, Any]]) -> str:
    entries = []
    by_shape: dict[tuple[int, int, bool], list[dict[str, Any]]] = collections.defaultdict(list)
    for record in records:
        key = (record["out_features"], record["in_features"], record["epilogue"] == "silu_and_mul")
        by_shape[key].append(record)
    for key, group in sorted(by_shape.items()):
        group.sort(key=lambda r: r["rows"])
        adopted: list[dict[str, Any]] = []
        for record in group:
            gemvs = [v for v in _timed(record) if v["name"] != "default"]
            if not gemvs or min(v["us"] for v in gemvs) > WIN * record["baseline_us"]:
                break
            adopted.append(record)
        if not adopted:
            entries.append(f"{key}: GemvTuning(max_rows=0, block_n=1, budget=4096, num_warps=4)")
            continue
        params = {_gemv_params(v) for v in _timed(adopted[0]) if v["name"] != "default"}

        def total(choice: tuple[int, int, int, int]) -> float:
            return sum(min((v["us"] for v in _timed(r) if v["name"] != "default" and
                            _gemv_params(v) == choice), default=float("inf")) for r in adopted)

        block_n, budget, num_warps, num_stages = min(sorted(params), key=total)
        entries.append(f"{key}: GemvTuning(max_rows={adopted[-1]['rows']}, block_n={block_n}, "
                       f"budget={budget}, num_warps={num_warps}, num_stages={num_stages})")
    return "{" + ", ".join(entries) + "}"


def _gemv_params(variant: dict[str, Any]) -> tuple[int, int, int, int]:
    return variant["block_n"], variant["budget"], variant["num_warps"], variant["num_stages"]
