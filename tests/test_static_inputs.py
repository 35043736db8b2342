"""StaticInputs: each call's token inputs staged into fixed buffers, padding rows refilled."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx

from runtime.static_inputs import StaticInputs

LARGEST, WIDTH, PAD = 8, 3, -1.0


def _static() -> StaticInputs:
    gm = fx.symbolic_trace(lambda x: x * 2)
    return StaticInputs(gm, [torch.zeros(2, WIDTH)], (0,), LARGEST, torch.device("cpu"))


@given(calls=st.lists(st.tuples(st.integers(1, LARGEST), st.integers(0, 2)), min_size=1,
                      max_size=6))
def test_property_every_call_sees_its_rows_and_fresh_padding(
        calls: list[tuple[int, int]]) -> None:
    """Whatever came before, rows [0, n) are the call's tokens and rows [n, bucket) are what
    fill_padding wrote for this call (never a previous call's tokens)."""
    static = _static()
    for call, (tokens, extra) in enumerate(calls):
        bucket = min(tokens + extra, LARGEST)
        filled: list[int] = []

        def fill(rows: torch.Tensor) -> None:
            filled.append(rows.shape[0])
            rows.fill_(PAD)

        x = torch.full((tokens, WIDTH), float(call))
        (staged,) = static.stage([x], tokens, bucket, fill)
        assert staged.shape == (bucket, WIDTH)
        assert staged.data_ptr() == static.buffers[0].data_ptr()  # the fixed address
        assert torch.equal(staged[:tokens], x)
        assert filled == ([bucket - tokens] if bucket > tokens else [])
        assert bool((staged[tokens:] == PAD).all())
