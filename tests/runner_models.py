"""Test-only splitting op and small graphs for the split and runner tests (CPU and GPU).

`fxkiln_test::causal_attention` stands in for the project's attention op until that lands: it
writes into an `output` tensor allocated by the piece before it and is causal over the token
dimension, so rows past the real tokens (padding) never reach the real rows. Shapes are tiny.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

TEST_OP = "fxkiln_test::causal_attention"
HIDDEN = 8
HEADS = 2


@torch.library.custom_op(TEST_OP, mutates_args=("output",))
def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     output: torch.Tensor) -> None:
    tokens = query.shape[0]
    scores = query @ key.transpose(0, 1) / query.shape[-1] ** 0.5  # (tokens, tokens)
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device).tril()
    output.copy_(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ value)


@causal_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
    return None


SPLITTING_OPS = (TEST_OP, F.scaled_dot_product_attention)


class AttentionStack(torch.nn.Module):
    """Layers of (test attention op, SDPA over the tokens as one sequence) with residuals.

    forward(x, n) with x (n, HIDDEN) and n the token count; returns the hidden states and a
    non-token output of 4 rows (so its dim 0 equals a bucket size without being the token dim).
    """

    def __init__(self, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, 3 * HIDDEN) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.table = torch.nn.Parameter(torch.randn(4, HIDDEN))

    def forward(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(h).chunk(3, dim=-1)                   # (n, HIDDEN) each
            attended = torch.empty_like(q)
            causal_attention(q, k, v, attended)
            h = h + out(attended)
            heads = h.view(1, n, HEADS, HIDDEN // HEADS).transpose(1, 2)  # (1, HEADS, n, d)
            mixed = F.scaled_dot_product_attention(heads, heads, heads, is_causal=True)
            h = h + mixed.transpose(1, 2).reshape(n, HIDDEN)
        return self.norm(h), self.table * 2.0


def placeholder_weights_block(ids: torch.Tensor, positions: torch.Tensor,
                              embedding: torch.Tensor, w_in: torch.Tensor,
                              w_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weights as graph inputs (as Dynamo passes them), int token inputs, a dict output."""
    h = embedding[ids] + positions.unsqueeze(-1).to(embedding.dtype) * 0.01  # (tokens, HIDDEN)
    q = h @ w_in
    attended = torch.empty_like(q)
    causal_attention(q, q, h, attended)
    return {"hidden": (attended @ w_out).relu(), "embedding_sum": embedding.sum(0)}


def attention_stack_graph(layers: int = 2, seed: int = 0) -> fx.GraphModule:
    return fx.symbolic_trace(AttentionStack(layers, seed))


def placeholder_weights_graph() -> fx.GraphModule:
    return fx.symbolic_trace(placeholder_weights_block)


def placeholder_weights_inputs(tokens: int, weights: tuple[torch.Tensor, ...],
                               device: torch.device | str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, weights[0].shape[0], (tokens,), generator=generator)
    positions = torch.arange(tokens)
    return [ids.to(device), positions.to(device), *weights]


def make_weights(device: torch.device | str = "cpu", vocab: int = 16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randn(*shape, generator=generator).to(device)
                 for shape in ((vocab, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN)))


class CompiledLike:
    """What `runtime.generate` sees of a compiled model: a callable holding the model as .model."""

    def __init__(self, model: torch.nn.Module, runner: object) -> None:
        self.model = model
        self.runner = runner

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.runner(*inputs)  # type: ignore[operator]  (a BucketRunner)
