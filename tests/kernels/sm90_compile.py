"""Compile every Triton kernel for the H200 (sm_90) at the launch parameters the code chooses for
the models' decode shapes, and report each one's registers and stack bytes per thread, and its
16-byte global loads: counted in the PTX for every kernel (`ld.global.v4.b32`, `.v2.b64`,
16-byte `cp.async`: PTX requires a vector access aligned to its size, so ptxas keeps each one
128-bit), and in the SASS too for the first configuration of each kernel function, which ties
the two counts together (disassembling costs half a second a kernel, compiling from Triton's
cache a few milliseconds).

Triton compiles for a GPU target without a GPU (its bundled ptxas makes the cubin; cuobjdump
reads the resource usage), which catches what the CPU interpreter cannot: code the GPU compiler
rejects and launch choices that spill to local memory. Run as a script (the kernels must be
jitted for the GPU, so not in a process that set TRITON_INTERPRET):

    python -m tests.kernels.sm90_compile      # one JSON line: label -> usage or error
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from runtime.kernels import attention_jit, decode_attention, linear_jit, triton_jit, triton_kernels
from runtime.kernels import varlen_attention_jit
from runtime.kernels import triton_linear
from runtime.kv_cache import AttentionSpec

PROCESSORS = 132  # the H200's SMs
MODELS = {"llama-1b": (32, 8, 64, 2048), "llama-8b": (32, 8, 128, 4096),
          "bart-large": (16, 16, 64, 1024)}  # heads, KV heads, head size, hidden
PROJECTIONS = ((3072, 1024, "none"), (1024, 1024, "none"), (4096, 1024, "gelu"),
               (1024, 4096, "none"), (3072, 2048, "none"), (2048, 2048, "none"),
               (8192, 2048, "silu_and_mul"), (2048, 8192, "none"), (6144, 4096, "none"))
# The projections a norm feeds, with the norm as their prologue (norm, carried rows): BART's
# QKV, cross-attention Q and fc1 after an add + LayerNorm (post-norm: the normalized rows
# carried), Llama-1B's and Llama-8B's QKV and gate_up after an add + RMSNorm (the sum carried).
NORMED_PROJECTIONS = ((3072, 1024, "none", "layer"), (1024, 1024, "none", "layer"),
                      (4096, 1024, "gelu", "layer"), (3072, 2048, "none", "rms"),
                      (8192, 2048, "silu_and_mul", "rms"), (6144, 4096, "none", "rms"),
                      (14336, 4096, "silu_and_mul", "rms"))
GEMV_POINTERS = ("out_ptr", "x_ptr", "weight_ptr", "bias_ptr", "residual_ptr", "sum_ptr",
                 "normed_ptr", "norm_weight_ptr", "norm_bias_ptr")
BF16 = "*bf16"
ATTENTION_TYPES = {**{name: BF16 for name in ("out_ptr", "query_ptr", "key_ptr", "value_ptr",
                                              "key_cache_ptr", "value_cache_ptr")},
                   "partial_ptr": "*fp32", "stats_ptr": "*fp32", "tables_ptr": "*i64",
                   "seq_lens_ptr": "*i32", "slots_ptr": "*i64", "arrivals_ptr": "*i32",
                   "positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "scale": "fp32"}
Config = tuple[str, Any, dict[str, str], dict[str, Any], int]  # label, kernel, types, consts, warps
ALIGNED_SIZES = ("hidden", "head_size", "half_rotary", "vocab")  # multiples of 16 here (Llama)


# 16-byte global loads in PTX: vector loads of four 32-bit or two 64-bit words, 16-byte async
# copies (cp.async's size operand, then an optional source size)
PTX_VECTOR_LOADS = re.compile(r"\b(?:ld\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64)\b|"
                              r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10\b)")
SASS_VECTOR_LOADS = re.compile(r"\b(?:LDG|LDGSTS)\.E[.\w]*128\b")


def usage(kernel: Any, types: dict[str, str], constexprs: dict[str, Any],
          num_warps: int, sass: bool = False) -> dict[str, int]:
    """Compile `kernel` for sm_90: registers and stack bytes per thread, and the 16-byte global
    loads in its PTX (`sass`: in its SASS too, as "sass_vector_loads"). Pointers, strides and
    widths are taken as multiples of 16, as Triton specializes them at launch for these models'
    shapes (allocations are aligned; every width is)."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                 for name in kernel.arg_names}
    aligned = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
               if signature[name].startswith("*") or "stride" in name or name in ALIGNED_SIZES}
    source = ASTSource(fn=kernel, signature=signature, attrs=aligned, constexprs={
        (kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True,
                                text=True, check=True).stdout
        machine_code = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True,
                                      text=True, check=True).stdout if sass else None
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", report, re.S)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report: {report[-300:]}")
    result = {"registers": int(found.group(1)), "stack": int(found.group(2)),
              "vector_loads": len(PTX_VECTOR_LOADS.findall(compiled.asm["ptx"]))}
    if machine_code is not None:
        result["sass_vector_loads"] = len(SASS_VECTOR_LOADS.findall(machine_code))
    return result


def configs() -> Iterator[Config]:
    """Each kernel at the code's launch choices for the models' decode shapes."""
    for model, (heads, kv_heads, head_size, hidden) in MODELS.items():
        spec = AttentionSpec(heads, kv_heads, head_size, head_size ** -0.5)
        for batch in (1, 64):
            plan = decode_attention.decode_plan(spec, batch, PROCESSORS)
            block_s = triton_kernels._next_power_of_2(plan.splits)
            for combine in (False, True) if plan.splits > 1 else (False,):
                yield (f"attention {model} batch {batch}" + (" combining" if combine else ""),
                       attention_jit.grouped_decode_attention_kernel, ATTENTION_TYPES, dict(
                           NUM_HEADS=heads, GROUP=heads // kv_heads, HEAD_SIZE=head_size,
                           KV_ROW=kv_heads * head_size, BLOCK_G=plan.block_g,
                           BLOCK_D=plan.block_d, BLOCK_N=plan.block_n, PARTIAL=plan.splits > 1,
                           COMBINE=combine, BLOCK_S=block_s, WRITE_NEW=plan.fuse_write,
                           ROTARY=model.startswith("llama"), IS_NEOX=True,
                           DOT_PRECISION="tf32", UPCAST=False, DEPENDENT=True), plan.num_warps)
            if plan.splits > 1:
                yield (f"reduce {model} batch {batch}", attention_jit.decode_reduce_kernel,
                       {"out_ptr": BF16, "partial_ptr": "*fp32", "stats_ptr": "*fp32"},
                       dict(NUM_HEADS=heads, HEAD_SIZE=head_size, BLOCK_D=plan.block_d,
                            BLOCK_S=block_s, DEPENDENT=True),
                       decode_attention.reduce_warps(plan))
        yield from _varlen(model, heads, kv_heads, head_size)
        block, warps = triton_kernels._norm_constants(torch.empty(1, hidden))
        layer = model.startswith("bart")
        yield (f"add + norm {model}", triton_jit.norm_rows_kernel,
               {name: BF16 for name in ("out_ptr", "residual_out_ptr", "x_ptr", "residual_ptr",
                                        "weight_ptr", "bias_ptr")} | {"eps": "fp32"},
               dict(HAS_RESIDUAL=True, LAYER_NORM=layer, HAS_BIAS=layer, BLOCK_SIZE=block,
                    DEPENDENT=True), warps)
        if not layer:
            constants = triton_kernels.rotary_embedding_constants(
                torch.zeros(1, dtype=torch.long), torch.empty(1, heads * head_size),
                torch.empty(1, kv_heads * head_size), torch.empty(8, head_size), head_size, True)
            yield (f"rotary {model}", triton_jit.rotary_kernel,
                   {name: BF16 for name in ("query_out_ptr", "key_out_ptr", "query_ptr",
                                            "key_ptr")} | {"positions_ptr": "*i64",
                                                           "cache_ptr": "*fp32"},
                   dict(IS_NEOX=True, QUERY_HEADS_BLOCK=constants[0],
                        KEY_HEADS_BLOCK=constants[1], HALF_BLOCK=constants[2],
                        PASS_BLOCK=constants[3]), constants[4])
    for out_features, in_features, epilogue, norm in (
            *((*shape, "none") for shape in PROJECTIONS), *NORMED_PROJECTIONS):
        tuning = triton_linear.gemv_tuning(out_features, in_features,
                                           epilogue == "silu_and_mul", 0, PROCESSORS)
        prologue = "" if norm == "none" else f" {norm} prologue"
        for rows in (1, 8):
            block_m, block_k = triton_linear.gemv_blocks(rows, in_features, tuning.block_n,
                                                         tuning.budget)
            yield (f"gemv {out_features}x{in_features} {epilogue}{prologue} rows {rows}",
                   linear_jit.linear_rows_kernel,
                   {name: BF16 for name in GEMV_POINTERS} | {"eps": "fp32"},
                   dict(OUT_FEATURES=out_features, IN_FEATURES=in_features, HAS_BIAS=True,
                        ACTIVATION=triton_linear.ACTIVATION_CODES[epilogue],
                        PROLOGUE=triton_linear.NORM_CODES[norm], HAS_RESIDUAL=norm != "none",
                        HAS_NORM_BIAS=norm == "layer", STORE_SUM=norm == "rms",
                        STORE_NORMED=norm == "layer", BLOCK_M=block_m, BLOCK_N=tuning.block_n,
                        BLOCK_K=block_k, NUM_STAGES=tuning.num_stages, DOT_PRECISION="tf32",
                        UPCAST=False, DEPENDENT=True),
                   tuning.num_warps)
    yield from _argmax()


def _argmax() -> Iterator[Config]:
    """The greedy token's two kernels at the launcher's block for a 128k vocabulary."""
    from runtime.kernels import argmax_jit, triton_argmax

    block, warps = triton_argmax.argmax_constants(torch.empty(1, 128256, device="meta"))
    yield ("argmax blocks", argmax_jit.argmax_blocks_kernel,
           {"out_ptr": "*i64", "value_ptr": "*fp32", "index_ptr": "*i32", "x_ptr": BF16},
           dict(BLOCK=block, SINGLE=False), warps)
    yield ("argmax combine", argmax_jit.argmax_combine_kernel,
           {"out_ptr": "*i64", "value_ptr": "*fp32", "index_ptr": "*i32"},
           dict(BLOCK_S=triton_kernels._next_power_of_2(-(-128256 // block))), 1)


def _varlen(model: str, heads: int, kv_heads: int, head_size: int) -> Iterator[Config]:
    """The prefill attention as runtime/attention.py launches it: causal over the KV cache
    (decoders), and over the step's own rows (BART's encoder)."""
    from runtime.attention import VARLEN_BLOCK_M, VARLEN_BLOCK_N

    types = {**{name: BF16 for name in ("out_ptr", "query_ptr", "key_ptr", "value_ptr")},
             "tables_ptr": "*i64", "query_start_ptr": "*i32", "seq_lens_ptr": "*i32",
             "scale": "fp32"}
    kinds = [("prefill", True)] + ([("encoder", False)] if model.startswith("bart") else [])
    for kind, paged in kinds:
        yield (f"varlen {model} {kind}", varlen_attention_jit.varlen_attention_kernel,
               types if paged else {**types, "tables_ptr": "*i32"}, dict(
                   GROUP=heads // kv_heads, HEAD_SIZE=head_size, BLOCK_M=VARLEN_BLOCK_M,
                   BLOCK_N=VARLEN_BLOCK_N,
                   BLOCK_D=max(16, triton_kernels._next_power_of_2(head_size)),
                   CAUSAL=paged, PAGED=paged, IEEE=False), 4)


def main() -> None:
    if triton_kernels.interpreter_active():
        raise SystemExit("sm90_compile: the kernels were jitted for the interpreter; "
                         "run without TRITON_INTERPRET")
    results: dict[str, Any] = {}
    disassembled: set[int] = set()  # kernel functions whose SASS was read once
    for label, kernel, types, constexprs, num_warps in configs():
        sass = id(kernel) not in disassembled
        disassembled.add(id(kernel))
        try:
            results[label] = usage(kernel, types, constexprs, num_warps, sass)
        except Exception as error:  # noqa: BLE001  (reported per kernel)
            results[label] = {"error": f"{type(error).__name__}: {error}"[-400:]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
