"""The cases of `benchmarks/kernels.py`: each fxkiln Triton kernel on a model's real decode
shapes, with its native twin (the baseline and the correctness reference), the code's current
choice (`default`) and a sweep of its launch parameters.

A case's callables take a buffer-set index: inputs are rotated over `copies` sets (weights or
KV caches) so that timing measures device memory, not the 60 MB L2, as a whole decode step
(which streams every weight through the cache) does.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.attention import native_attention
from runtime.forward_context import AttentionMetadata
from runtime.kernels import decode_attention as attention_kernels, native, triton_kernels
from runtime.kernels import triton_linear, triton_norm_linear
from runtime.kernels.decode_attention import DecodePlan, decode_plan
from runtime.kv_cache import AttentionSpec, LayerKVCache

Run = Callable[[int], Any]
ROTATE_BYTES = 256 * 2**20  # rotate buffers until a pass over them is this large (>> L2)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    norm: str                                      # "rms" | "layer"
    projections: tuple[tuple[int, int, str, bool], ...]  # (out, in, epilogue, bias) per decode
    rotary: bool


MODELS = {
    "llama-1b": ModelShape(2048, 32, 8, 64, "rms", (
        (3072, 2048, "none", False), (2048, 2048, "none", False),
        (8192, 2048, "silu_and_mul", False), (2048, 8192, "none", False),
        (128256, 2048, "none", False)), rotary=True),
    "llama-8b": ModelShape(4096, 32, 8, 128, "rms", (
        (6144, 4096, "none", False), (4096, 4096, "none", False),
        (14336, 4096, "silu_and_mul", False), (4096, 14336, "none", False),
        (128256, 4096, "none", False)), rotary=True),
    "bart-large": ModelShape(1024, 16, 16, 64, "layer", (
        (3072, 1024, "none", True), (1024, 1024, "none", True), (4096, 1024, "gelu", True),
        (1024, 4096, "none", True), (50265, 1024, "none", True)), rotary=False),
}
TINY = {  # CPU smoke shapes (Triton interpreted): the same kinds of layers, tiny
    "llama-1b": ModelShape(64, 4, 2, 16, "rms", (
        (96, 64, "none", False), (48, 64, "silu_and_mul", False)), rotary=True),
    "llama-8b": ModelShape(64, 4, 1, 32, "rms", (
        (192, 64, "none", False), (64, 96, "none", False)), rotary=True),
    "bart-large": ModelShape(64, 4, 4, 16, "layer", (
        (192, 64, "none", True), (128, 64, "gelu", True)), rotary=False),
}


# The projections a norm feeds in each model (the add + norm before them folds into their GEMV),
# and the rows the layer carries on past it: Llama's sum, BART's (post-norm) normalized rows.
NORMED = {
    "llama-1b": (((3072, 2048, "none", False), (8192, 2048, "silu_and_mul", False)), "sum"),
    "llama-8b": (((6144, 4096, "none", False), (14336, 4096, "silu_and_mul", False)), "sum"),
    "bart-large": (((3072, 1024, "none", True), (4096, 1024, "gelu", True)), "normed"),
}


@dataclass
class Case:
    kernel: str
    model: str
    key: dict[str, Any]                       # the shape facts: batch, context, features...
    baseline: Run                             # the native twin
    variants: dict[str, tuple[dict[str, Any], Run]]
    default: str                              # the variant the code chooses today
    check: Callable[[], tuple[Any, Any]]      # (default's output, native's) on fresh inputs
    copies: int = 1
    peers: dict[str, Run] = field(default_factory=dict)  # other references, timed only


def _copies(bytes_per_set: int, cap: int) -> int:
    return max(1, min(cap, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))


def attention_case(model: str, shape: ModelShape, batch: int, context: int,
                   device: torch.device, dtype: torch.dtype, sweep: dict[str, tuple]) -> Case:
    spec = AttentionSpec(shape.heads, shape.kv_heads, shape.head_size, shape.head_size ** -0.5)
    max_len = context + 1
    kv_shape = (batch * max_len, shape.kv_heads, shape.head_size)
    copies = _copies(2 * math.prod(kv_shape) * dtype.itemsize, sweep["max_copies"])
    caches = [LayerKVCache(spec, torch.randn(kv_shape, device=device, dtype=dtype),
                           torch.randn(kv_shape, device=device, dtype=dtype))
              for _ in range(copies)]
    tables = torch.arange(batch * max_len, device=device).view(batch, max_len)
    slots = tables[:, context - 1].contiguous()
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    meta = AttentionMetadata(tuple(range(batch + 1)), (context,) * batch, slots, tables,
                             seq_lens_tensor=lengths)
    query = torch.randn(batch, shape.heads * shape.head_size, device=device, dtype=dtype)
    key, value = (torch.randn(batch, shape.kv_heads * shape.head_size, device=device,
                              dtype=dtype) for _ in range(2))
    out = torch.empty_like(query)

    def run(plan: DecodePlan) -> Run:
        def launch(i: int) -> None:
            cache, written = caches[i % copies], slots
            if not plan.fuse_write:
                attention_kernels.write_kv(cache, key, value, slots)
                written = None
            attention_kernels.launch_decode(query, key, value, out, cache, tables, lengths,
                                            written, batch, plan)
        return launch

    default = decode_plan(spec, batch, triton_kernels.device_processors(device))
    variants = {"default": (_plan_params(default), run(default))}
    unfused = dataclasses.replace(default, fuse_write=False)
    variants["default-unfused-write"] = (_plan_params(unfused), run(unfused))
    if default.splits > 1:  # the combine as a second launch (the reduce kernel), not in-kernel
        separate = dataclasses.replace(default, fuse_reduce=not default.fuse_reduce)
        variants["default-other-reduce"] = (_plan_params(separate), run(separate))
    group_block = triton_kernels._next_power_of_2(shape.heads // shape.kv_heads)
    if group_block != default.block_g:  # the group unpadded (tl.dot pads small tiles itself)
        narrow = dataclasses.replace(default, block_g=group_block)
        variants["default-narrow-group"] = ({**_plan_params(narrow), "block_g": group_block},
                                            run(narrow))
    for splits in sweep["splits"]:
        for block_n, num_warps in sweep["blocks"]:
            if splits > 1 and (splits - 1) * block_n >= context:
                continue  # some splits would get no position at all
            plan = DecodePlan(splits, block_n, num_warps, default.block_g, default.block_d, True,
                              default.fuse_reduce)
            variants[f"s{splits}-n{block_n}-w{num_warps}"] = (_plan_params(plan), run(plan))
    def check() -> tuple[Any, Any]:
        expected = torch.empty_like(out)
        native_attention(query, key, value, expected, caches[0], meta)
        variants["default"][1](0)
        return out.clone(), expected

    return Case("decode_attention", model,
                {"batch": batch, "context": context, "heads": shape.heads,
                 "kv_heads": shape.kv_heads, "head_size": shape.head_size},
                lambda i: native_attention(query, key, value, out, caches[i % copies], meta),
                variants, "default", check, copies,
                peers={"sdpa-dense-gqa": _dense_sdpa(query, caches[:2], shape, batch, context)})


def _dense_sdpa(query: torch.Tensor, caches: list[LayerKVCache], shape: ModelShape, batch: int,
                context: int) -> Run:
    """The peer: SDPA with GQA over dense (batch, kv_heads, context, head_size) K/V, the layout
    of a Hugging Face static cache."""
    dense = [(cache.key[:batch * context].view(batch, context, shape.kv_heads, -1)
              .transpose(1, 2).contiguous()) for cache in caches]

    def attend(i: int) -> Any:
        keys = dense[i % len(dense)]
        return torch.nn.functional.scaled_dot_product_attention(
            query.view(batch, shape.heads, 1, -1), keys, keys, enable_gqa=True)
    return attend


def _plan_params(plan: DecodePlan) -> dict[str, Any]:
    return {"splits": plan.splits, "block_n": plan.block_n, "num_warps": plan.num_warps,
            "fuse_write": plan.fuse_write, "fuse_reduce": plan.fuse_reduce}


def linear_case(model: str, projection: tuple[int, int, str, bool], rows: int,
                device: torch.device, dtype: torch.dtype, sweep: dict[str, tuple]) -> Case:
    out_features, in_features, epilogue, has_bias = projection
    weight_rows = 2 * out_features if epilogue == "silu_and_mul" else out_features
    copies = _copies(weight_rows * in_features * dtype.itemsize, sweep["max_copies"])
    scale = in_features ** -0.5
    weights = [torch.randn(weight_rows, in_features, device=device, dtype=dtype) * scale
               for _ in range(copies)]
    bias = torch.randn(weight_rows, device=device, dtype=dtype) * 0.1 if has_bias else None
    x = torch.randn(rows, in_features, device=device, dtype=dtype)

    def gemv(constants: tuple[int, ...]) -> Run:
        return lambda i: triton_linear.linear(x, weights[i % copies], bias, epilogue, *constants)

    chosen = triton_linear.linear_constants(x, weights[0], bias, epilogue)
    names = ("max_rows", "block_n", "budget", "num_warps", "num_stages")
    variants = {"default": (dict(zip(names, chosen)), gemv(chosen))}
    processors = triton_kernels.device_processors(device)
    rule = triton_linear.gemv_tuning(out_features, in_features, epilogue == "silu_and_mul", 0,
                                     processors).block_n  # the rule's block, size aside
    for block_n in (rule, 2 * rule):
        for budget, num_warps in sweep["budgets"]:
            for num_stages in sweep["stages"]:
                constants = (rows, block_n, budget, num_warps, num_stages)
                variants[f"n{block_n}-b{budget}-w{num_warps}-s{num_stages}"] = (
                    dict(zip(names, constants)), gemv(constants))

    def check() -> tuple[Any, Any]:
        forced = (rows, *chosen[1:]) if chosen[0] else (rows, 16, 4096, 4, 3)  # the GEMV itself
        return gemv(forced)(0), native.linear(x, weights[0], bias, epilogue)

    return Case("linear", model, {"rows": rows, "out_features": out_features,
                                  "in_features": in_features, "epilogue": epilogue,
                                  "bias": has_bias},
                lambda i: triton_linear.unfused(x, weights[i % copies], bias, epilogue),
                variants, "default", check, copies)


def norm_linear_case(model: str, shape: ModelShape, projection: tuple[int, int, str, bool],
                     rows: int, device: torch.device, dtype: torch.dtype,
                     sweep: dict[str, tuple]) -> Case:
    """Add + norm folded into the projection it feeds (the code's choice), against the native
    twin and, as a peer, the unfused Triton pair: the norm kernel, then the GEMV."""
    out_features, in_features, epilogue, has_bias = projection
    weight_rows = 2 * out_features if epilogue == "silu_and_mul" else out_features
    copies = _copies(weight_rows * in_features * dtype.itemsize, sweep["max_copies"])
    x, residual = (torch.randn(rows, in_features, device=device, dtype=dtype) for _ in range(2))
    norm_weight = (1 + 0.1 * torch.randn(in_features, device=device)).to(dtype)
    norm_bias = (0.1 * torch.randn(in_features, device=device)).to(dtype) \
        if shape.norm == "layer" else None
    weights = [torch.randn(weight_rows, in_features, device=device, dtype=dtype) *
               in_features ** -0.5 for _ in range(copies)]
    bias = torch.randn(weight_rows, device=device, dtype=dtype) * 0.1 if has_bias else None
    carry = NORMED[model][1] if model in NORMED else "sum"

    def args(i: int) -> tuple[Any, ...]:
        return (x, residual, norm_weight, norm_bias, 1e-5, shape.norm, weights[i % len(weights)],
                bias, epilogue, carry)

    constants = triton_norm_linear.add_norm_linear_constants(*args(0))
    pair_op = f"fused_add_{shape.norm}_norm"

    def pair(i: int) -> Any:
        normed = getattr(triton_kernels, pair_op)(*_norm_args(args(i)), *constants[5:7])[0]
        return triton_linear.linear(normed, args(i)[6], bias, epilogue, *constants[:5])

    forced = ((rows, *constants[1:7], rows) if constants[0]
              else (rows, 16, 4096, 4, 3, *constants[5:7], rows))
    key = {"rows": rows, "out_features": out_features, "in_features": in_features,
           "epilogue": epilogue, "bias": has_bias, "norm": shape.norm, "carry": carry}
    return Case("norm_linear", model, key,
                lambda i: native.add_norm_linear(*args(i)),
                {"default": ({"max_rows": constants[0], "prologue_rows": constants[7]},
                             lambda i: triton_norm_linear.add_norm_linear(*args(i), *constants)),
                 "prologue": ({"max_rows": forced[0], "prologue_rows": rows},
                              lambda i: triton_norm_linear.add_norm_linear(*args(i), *forced))},
                "default",
                lambda: (triton_norm_linear.add_norm_linear(*args(0), *forced)[0],
                         native.add_norm_linear(*args(0))[0]),
                copies, peers={"triton norm, then GEMV": pair})


def _norm_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """add_norm_linear's arguments as the add + norm op takes them."""
    x, residual, weight, bias, eps, norm = args[:6]
    return (x, residual, weight, eps) if norm == "rms" else (x, residual, weight, bias, eps)


def norm_case(model: str, shape: ModelShape, rows: int, device: torch.device,
              dtype: torch.dtype, sweep: dict[str, tuple]) -> Case:
    """Residual add + the model's norm (every norm of a decode step but the first adds)."""
    x, residual = (torch.randn(rows, shape.hidden, device=device, dtype=dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape.hidden, device=device)).to(dtype)
    bias = (0.1 * torch.randn(shape.hidden, device=device)).to(dtype)
    if shape.norm == "layer":
        args, op = (x, residual, weight, bias, 1e-5), "fused_add_layer_norm"
    else:
        args, op = (x, residual, weight, 1e-6), "fused_add_rms_norm"
    launcher, twin = getattr(triton_kernels, op), getattr(native, op)
    block, warps = triton_kernels._norm_constants(x)
    variants = {"default": ({"num_warps": warps}, lambda i: launcher(*args, block, warps))}
    for num_warps in sweep["norm_warps"]:
        variants[f"w{num_warps}"] = ({"num_warps": num_warps},
                                     lambda i, w=num_warps: launcher(*args, block, w))
    return Case("norm", model, {"rows": rows, "hidden": shape.hidden, "op": op},
                lambda i: twin(*args), variants, "default",
                lambda: (launcher(*args, block, warps)[0], twin(*args)[0]))


def rotary_case(model: str, shape: ModelShape, rows: int, device: torch.device,
                dtype: torch.dtype, sweep: dict[str, tuple]) -> Case:
    q_width, kv_width = shape.heads * shape.head_size, shape.kv_heads * shape.head_size
    qkv = torch.randn(rows, q_width + 2 * kv_width, device=device, dtype=dtype)
    query, key = qkv[:, :q_width], qkv[:, q_width:q_width + kv_width]
    angles = torch.arange(4096, device=device)[:, None] * torch.rand(shape.head_size // 2,
                                                                     device=device)
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    positions = torch.randint(0, 4096, (rows,), device=device)
    args = (positions, query, key, cache, shape.head_size, True)
    constants = triton_kernels.rotary_embedding_constants(*args)
    variants = {"default": ({"num_warps": constants[-1]},
                            lambda i: triton_kernels.rotary_embedding(*args, *constants))}
    for num_warps in sweep["rotary_warps"]:
        variants[f"w{num_warps}"] = ({"num_warps": num_warps}, lambda i, w=num_warps:
                                     triton_kernels.rotary_embedding(*args, *constants[:-1], w))
    return Case("rotary", model, {"rows": rows, "heads": shape.heads, "kv_heads": shape.kv_heads,
                                  "head_size": shape.head_size},
                lambda i: native.rotary_embedding(*args), variants, "default",
                lambda: (torch.cat(variants["default"][1](0), -1),
                         torch.cat(native.rotary_embedding(*args), -1)))
