"""CompileReport: what compilation did, in numbers a user can check."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compiler.pass_manager import PassRecord
from passes.fx_utils import constant_tensor, is_getitem, is_view_like, tensor_meta
from runtime.runner import RunnerStats


@dataclass
class CompileReport:
    """Per-pass matches and time; FLOPs and weight bytes before and after; runtime figures.

    `pieces`, `captured_sizes`, `captured_signatures`, `capture_seconds`, `graph_memory_bytes`
    and the KV cache figures come from the runner (`set_runtime`): for a Dynamo graph they grow
    as its signatures are captured, on first use. `capture_note` says why nothing is captured.
    They stay 0/empty when the model runs without a runner.
    """

    frontend: str = ""
    device: str = ""
    passes: dict[str, PassRecord] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)
    flops_before: int = 0
    flops_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    pieces: int = 0
    captured_sizes: tuple[int, ...] = ()
    decode_graph_sizes: tuple[int, ...] = ()   # sizes whose whole decode step is one graph
    prefill_graph_sizes: tuple[int, ...] = ()  # prefill buckets: pieces replay, LM head eager
    captured_signatures: tuple[str, ...] = ()  # Dynamo graphs: the signatures with graphs
    capture_seconds: float = 0.0
    graph_memory_bytes: int = 0
    capture_note: str = ""  # why nothing is captured (or not yet), or how it is limited
    compile_seconds: float = 0.0
    weight_memory_bytes: int = 0               # what the model's weights take on the device
    kv_cache_tokens: int = 0                   # slots of the runner's KV cache (0: none)
    kv_cache_bytes: int = 0

    def set_runtime(self, stats: RunnerStats) -> None:
        """Take the runtime figures of a runner's `RunnerStats`."""
        self.pieces, self.captured_sizes = stats.pieces, stats.captured_sizes
        self.decode_graph_sizes = stats.decode_graph_sizes
        self.prefill_graph_sizes = stats.prefill_graph_sizes
        self.captured_signatures = stats.captured_signatures
        self.capture_seconds = stats.capture_seconds
        self.graph_memory_bytes = stats.graph_memory_bytes
        self.capture_note = stats.note
        self.kv_cache_tokens, self.kv_cache_bytes = stats.kv_cache_tokens, stats.kv_cache_bytes

    def add_passes(self, records: Sequence[PassRecord]) -> None:
        for record in records:
            key, suffix = record.name, 2
            while key in self.passes:  # a pass that runs twice is listed twice
                key, suffix = f"{record.name}#{suffix}", suffix + 1
            self.passes[key] = record

    def __str__(self) -> str:
        rows = [("pass", "matches", "modified", "seconds")]
        rows += [(name, str(r.matches), "yes" if r.modified else "no", f"{r.seconds:.4f}")
                 for name, r in self.passes.items()]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"fxkiln compile report ({self.frontend}, {self.device}, "
                 f"{self.compile_seconds:.2f} s)"]
        for i, row in enumerate(rows):
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        lines.append(f"  FLOPs          {self.flops_before:>14,} -> {self.flops_after:,}"
                     f" ({_change(self.flops_before, self.flops_after)})")
        lines.append(f"  weight bytes   {self.weight_bytes_before:>14,} -> "
                     f"{self.weight_bytes_after:,} "
                     f"({_change(self.weight_bytes_before, self.weight_bytes_after)})")
        kernels = ", ".join(f"{op}={impl}" for op, impl in sorted(self.kernels.items())) or "none"
        lines.append(f"  kernels        {kernels}")
        sizes = ", ".join(map(str, self.captured_sizes)) or "none"
        lines.append(f"  pieces         {self.pieces}; captured sizes: {sizes}; "
                     f"capture {self.capture_seconds:.2f} s, "
                     f"{self.graph_memory_bytes / 2**20:.1f} MiB graph memory")
        whole = ", ".join(map(str, self.decode_graph_sizes)) or "none"
        lines.append(f"  decode steps   one graph each at sizes: {whole}")
        prefill = ", ".join(map(str, self.prefill_graph_sizes)) or "none"
        lines.append(f"  prefill steps  pieces replay, LM head eager, at sizes: {prefill}")
        lines.append(f"  memory         weights {self.weight_memory_bytes / 2**30:.3f} GiB, "
                     f"graphs {self.graph_memory_bytes / 2**30:.3f} GiB, KV cache "
                     f"{self.kv_cache_tokens} tokens {self.kv_cache_bytes / 2**30:.3f} GiB")
        lines += [f"  signature      {label}" for label in self.captured_signatures]
        if self.capture_note:
            label = "note        " if self.captured_sizes else "not captured"
            lines.append(f"  {label}   {self.capture_note}")
        return "\n".join(lines)


def _change(before: int, after: int) -> str:
    if before == 0:
        return "n/a"
    return f"{100.0 * (after - before) / before:+.1f}%"


def _cpu_sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                    *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# SDPA's CPU kernel, which torch's counter has no formula for (its CUDA kernels it counts): an
# attention then counts the same on every device, SDPA's or fxkiln's cache_attention.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(run: Any, inputs: Sequence[Any]) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter (matmuls, convs, attention)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        run(*inputs)
    return int(counter.get_total_flops())


def weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of compile-time constant tensors the graph's compute ops read, per call.

    Each op that reads a weight counts it (a weight read by two GEMMs counts twice). An op that
    reads a view of a weight (a row slice, say) counts the view's bytes, so narrowing a
    projection to the rows it uses lowers this number.
    """
    total = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if is_view_like(node) or is_getitem(node) or _is_slicing(node):
            continue
        for arg in node.all_input_nodes:
            if not _derives_from_constant(gm, arg):
                continue
            value = tensor_meta(arg)
            if value is None:
                value = constant_tensor(gm, arg)
            if value is not None:
                total += _numel(value) * value.element_size()
    return total


def _is_slicing(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.narrow, torch.split,
                                                          torch.chunk, torch.Tensor.split)


def _derives_from_constant(gm: fx.GraphModule, node: fx.Node) -> bool:
    while True:
        if constant_tensor(gm, node) is not None:
            return True
        if not (is_view_like(node) or is_getitem(node) or _is_slicing(node)):
            return False
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return False
        node = source


def _numel(value: torch.Tensor) -> int:
    """Elements of `value` without adding a Dynamo guard.

    A symbolic count (a buffer sliced to the call's sequence length, as BERT's position ids
    are) is counted at the example call's size: `int()` on it would specialize the graph to
    that size, and Dynamo would recompile it for every new length.
    """
    numel = value.numel()
    if not isinstance(numel, torch.SymInt):
        return int(numel)
    static = numel.node.maybe_as_int()
    if static is not None:
        return static
    hint = numel.node.hint
    return hint if isinstance(hint, int) else 0
