"""Vocabulary-parallel embedding and LM head.

The vocabulary is padded up to a multiple of the TP size and split into equal contiguous ranges,
one per rank. Embedding: each rank looks up the ids in its range, zeros the rest, and the
partial results are all-reduced. LM head: each rank computes the logits of its range, they are
gathered and the padding columns dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import runtime.logits_rows  # noqa: F401  (registers torch.ops.fxkiln.logits_rows)
from models.layers.params import check_shape, make_param, set_weight_loader
from models.parallel import TensorParallel, all_gather_last_dim, all_reduce, current_tp


class VocabParallelEmbedding(nn.Module):
    """Token embedding with rows split over ranks; weight (vocab_per_partition, embedding_dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp or current_tp()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp.size)  # ceil
        self.vocab_start = self.tp.rank * self.num_embeddings_per_partition
        self.vocab_end = min(num_embeddings, self.vocab_start + self.num_embeddings_per_partition)
        self.weight = set_weight_loader(
            make_param(self.num_embeddings_per_partition, embedding_dim), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: object = None) -> None:
        """Rows [vocab_start, vocab_end) of the checkpoint; padding rows (if any) are zero."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, found {shard_id!r}")
        check_shape(tuple(loaded_weight.shape), (self.num_embeddings, *param.shape[1:]))
        rows = self.vocab_end - self.vocab_start
        param.data.zero_()
        param.data[:rows].copy_(loaded_weight[self.vocab_start:self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)  # (tokens, dim)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight)             # (tokens, dim)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(partial, self.tp)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.embedding_dim}, tp={self.tp.size}"


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the vocabulary; the weight may be tied to an embedding's.

    forward returns the full logits `(rows, num_embeddings)` on every rank, for the rows the
    step reads (`runtime.logits_rows`: a prefill step reads each sequence's last token only;
    outside generation, every row).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, *,
                 tp: TensorParallel | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, tp=tp)
        self.bias = (set_weight_loader(make_param(self.num_embeddings_per_partition),
                                       self.weight_loader) if bias else None)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share `embedding`'s weight (same vocabulary split, so each rank's shard matches)."""
        if (embedding.num_embeddings, embedding.tp) != (self.num_embeddings, self.tp):
            raise ValueError(f"cannot tie an LM head of vocab {self.num_embeddings} to an "
                             f"embedding of vocab {embedding.num_embeddings}")
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.ops.fxkiln.logits_rows.default(hidden_states)  # (rows, hidden)
        logits = F.linear(hidden_states, self.weight, self.bias)  # (rows, vocab / tp)
        logits = all_gather_last_dim(logits, self.num_embeddings_per_partition, self.tp)
        if self.num_embeddings_per_partition * self.tp.size != self.num_embeddings:
            logits = logits[:, :self.num_embeddings]                # (rows, vocab)
        return logits
