"""token_positions: a graph's own `arange` over its tokens becomes the positions input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compiler.report import count_flops
from passes import PassContext
from passes.token_positions import TokenPositionsPass
from tests.fx_helpers import graph_body, op_counts
from tests.serving_graphs import example_inputs, serving_graph


class LearnedPositions(nn.Module):
    """BART's way: positions counted with arange (offset 2) index a learned table."""

    def __init__(self, offset: int = 2, extra_arange: bool = False) -> None:
        super().__init__()
        self.offset, self.extra_arange = offset, extra_arange
        self.embed = nn.Embedding(11, 4)
        self.table = nn.Embedding(40, 4)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[0]
        counted = torch.arange(0, tokens, dtype=torch.long)
        out = self.embed(input_ids) + self.table(counted + self.offset)  # (tokens, 4)
        if self.extra_arange:  # not the token count: an index over the features
            out = out * torch.arange(out.shape[-1]).float()
        return out


def rewrite(module: nn.Module):
    gm = serving_graph(module, example_inputs(5, vocab=11))
    return gm, TokenPositionsPass(PassContext())(gm)


def test_golden() -> None:
    gm, result = rewrite(LearnedPositions())
    gm.graph.lint()
    assert result.matches == 1
    assert graph_body(gm) == """\
getattr_1 = input_ids.shape
getitem = getattr_1[0]
embed_weight = self.embed.weight
embedding = torch.nn.functional.embedding(input_ids, embed_weight, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False)
add = positions + 2
table_weight = self.table.weight
embedding_1 = torch.nn.functional.embedding(add, table_weight, padding_idx = None, max_norm = None, norm_type = 2.0, scale_grad_by_freq = False, sparse = False)
add_1 = embedding + embedding_1
return add_1"""


def test_op_counts() -> None:
    module = LearnedPositions(extra_arange=True)
    before = op_counts(serving_graph(module, example_inputs(5, vocab=11)))
    gm, result = rewrite(module)
    assert (before["arange"], op_counts(gm)["arange"], result.matches) == (2, 1, 1)


def test_arange_over_features_is_not_positions() -> None:
    """Must not rewrite: an arange whose length is a feature count (4), not the tokens."""

    class Features(nn.Module):
        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            features = torch.arange(positions[None].shape[0] * 4)        # 4 features
            shifted = torch.arange(1, input_ids.shape[0] + 1)            # starts at 1
            return input_ids[:, None] * features + shifted[:, None]

    gm, result = rewrite(Features())
    assert (result.matches, result.modified) == (0, False)
    assert op_counts(gm)["arange"] == 2


@settings(max_examples=10, deadline=None)
@given(offset=st.integers(0, 3), tokens=st.integers(1, 9), seed=st.integers(0, 99))
def test_flattened_sequences_read_their_positions(offset: int, tokens: int, seed: int) -> None:
    """Rewritten, the graph reads each row's position from the input: any positions (several
    sequences flattened, a decode step) give the table rows at those positions. Idempotent;
    FLOPs unchanged."""
    torch.manual_seed(seed)
    module = LearnedPositions(offset)
    gm, _ = rewrite(module)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (tokens,), generator=generator)
    positions = torch.randint(0, 30, (tokens,), generator=generator)
    expected = module.embed(ids) + module.table(positions + offset)
    torch.testing.assert_close(gm(ids, positions), expected)
    assert TokenPositionsPass(PassContext())(gm).matches == 0
    assert count_flops(gm, (ids, positions)) == count_flops(module, (ids, positions))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_an_arange_of_another_dtype_reads_cast_positions(dtype: torch.dtype) -> None:
    class Sinusoidal(nn.Module):
        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return torch.sin(torch.arange(input_ids.shape[0], dtype=dtype) * 0.5)

    gm, result = rewrite(Sinusoidal())
    assert result.matches == 1
    positions = torch.tensor([3, 0, 7])
    torch.testing.assert_close(gm(torch.zeros(3, dtype=torch.long), positions),
                               torch.sin(positions.to(dtype) * 0.5))
