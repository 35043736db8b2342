"""Tensor-parallel linear layers (vLLM's signatures). Each forward traces to one `F.linear`
plus, under TP, one functional collective; each returns a tensor.

Column parallel: the weight's output rows are split over ranks; each rank computes its slice of
the output features. Row parallel: the input features are split; each rank computes a partial
sum, all-reduced. QKV and merged layers are column parallel layers made of several stacked
projections; their loaders place each checkpoint tensor (q_proj, gate_proj, ...) in its rows.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.params import load_rows, make_param, set_weight_loader
from models.parallel import TensorParallel, all_gather_last_dim, all_reduce, current_tp, divide


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows sharded: each rank holds output_size / tp rows."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, *, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp or current_tp()
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp.size, "output_size")
        self.gather_output = gather_output
        self.weight = set_weight_loader(make_param(self.output_size_per_partition, input_size),
                                        self.weight_loader)
        self.bias = (set_weight_loader(make_param(self.output_size_per_partition), self.weight_loader)
                     if bias else None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, found {shard_id!r}")
        local = self.output_size_per_partition
        load_rows(param, loaded_weight, dim=0, dst_start=0, size=local,
                  src_start=self.tp.rank * local, src_total=self.output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (tokens, output_size / tp)
        if self.gather_output:
            out = all_gather_last_dim(out, self.output_size_per_partition, self.tp)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns sharded: x arrives sharded, partial sums all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 reduce_results: bool = True, *, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp or current_tp()
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp.size, "input_size")
        self.reduce_results = reduce_results
        self.weight = set_weight_loader(make_param(output_size, self.input_size_per_partition),
                                        self.weight_loader)
        self.bias = make_param(output_size) if bias else None  # replicated: default loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if shard_id is not None:
            raise ValueError(f"RowParallelLinear takes no shard id, found {shard_id!r}")
        local = self.input_size_per_partition
        load_rows(param, loaded_weight, dim=1, dst_start=0, size=local,
                  src_start=self.tp.rank * local, src_total=self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)  # (tokens, output_size)
        if not self.reduce_results:  # the caller sums over ranks: only rank 0 adds the bias
            return F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        partial = F.linear(x, self.weight)               # (tokens, output_size), this rank's part
        out = all_reduce(partial, self.tp)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}"


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked into one weight (gate_up_proj).

    Each rank's weight is [shard of part 0; shard of part 1; ...]; shard_id is the part index.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = True,
                 gather_output: bool = False, *, tp: TensorParallel | None = None) -> None:
        tp = tp or current_tp()
        self.output_sizes = tuple(output_sizes)
        for index, size in enumerate(self.output_sizes):
            divide(size, tp.size, f"output_sizes[{index}]")
        super().__init__(input_size, sum(self.output_sizes), bias, gather_output, tp=tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        if shard_id is None:  # a checkpoint that already stacks the parts
            super().weight_loader(param, loaded_weight)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"expected a part index in 0..{len(self.output_sizes) - 1}, "
                             f"found {shard_id!r}")
        size = self.output_sizes[shard_id] // self.tp.size
        dst_start = sum(self.output_sizes[:shard_id]) // self.tp.size
        load_rows(param, loaded_weight, dim=0, dst_start=dst_start, size=size,
                  src_start=self.tp.rank * size, src_total=self.output_sizes[shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections stacked into one column-parallel weight: rows [q; k; v] per rank.

    Query heads are split over ranks. KV heads are split too when there are at least as many as
    ranks; otherwise each rank keeps one KV head, replicated over tp / total_num_kv_heads ranks.
    Local sizes: `num_heads`, `num_kv_heads`, `q_size`, `kv_size`.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True, *,
                 tp: TensorParallel | None = None) -> None:
        tp = tp or current_tp()
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.num_heads = divide(total_num_heads, tp.size, "number of query heads")
        if tp.size >= self.total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp.size, self.total_num_kv_heads, "number of KV heads")
        else:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp.size, "number of KV heads")
            self.kv_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        local_out = self.q_size + 2 * self.kv_size
        super().__init__(hidden_size, local_out * tp.size, bias, gather_output=False, tp=tp)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        total_q = self.total_num_heads * self.head_size
        total_kv = self.total_num_kv_heads * self.head_size
        if shard_id is None:  # a checkpoint with q, k, v already stacked
            expected_rows = total_q + 2 * total_kv
            if loaded_weight.shape[0] != expected_rows:
                raise ValueError(f"expected {expected_rows} rows (q, k, v stacked), "
                                 f"found shape {tuple(loaded_weight.shape)}")
            for part, rows in zip("qkv", loaded_weight.split([total_q, total_kv, total_kv])):
                self.weight_loader(param, rows, part)
            return
        kv_rank = self.tp.rank // self.kv_replicas
        placement = {  # shard id -> (rows in this rank's weight, rows in the checkpoint)
            "q": (0, self.q_size, self.tp.rank * self.q_size, total_q),
            "k": (self.q_size, self.kv_size, kv_rank * self.kv_size, total_kv),
            "v": (self.q_size + self.kv_size, self.kv_size, kv_rank * self.kv_size, total_kv),
        }
        if shard_id not in placement:
            raise ValueError(f"expected shard id 'q', 'k' or 'v', found {shard_id!r}")
        dst_start, size, src_start, src_total = placement[shard_id]  # type: ignore[index]
        load_rows(param, loaded_weight, dim=0, dst_start=dst_start, size=size,
                  src_start=src_start, src_total=src_total)
