"""The Triton argmax (each row's greedy token) against torch.argmax, and the token chooser's
use of it: on CPU under TRITON_INTERPRET=1, and on the GPU."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from runtime import registry
from runtime.kernels import triton_kernels
from runtime.sampling import SamplingParams, TokenChooser

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")
SPECIAL = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def triton_argmax(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    impl = registry.kernel_implementations("argmax")["triton"]
    constants = impl.launch_constants(x)
    return impl.fn(x, block or constants[0], constants[1])


@st.composite
def logits(draw: st.DrawFn) -> torch.Tensor:
    """(rows, vocab) logits from a few distinct values, so rows tie; some NaN and +-inf."""
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 300))
    levels = draw(st.integers(1, 4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randint(0, levels, (rows, vocab), generator=generator).float()
    for name in draw(st.lists(st.sampled_from(sorted(SPECIAL)), max_size=3)):
        x[draw(st.integers(0, rows - 1)), draw(st.integers(0, vocab - 1))] = SPECIAL[name]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return x.to(dtype)


@needs_interpreter
@given(logits(), st.sampled_from([None, 1, 4, 16, 64]))
@example(torch.tensor([[1.0, 3.0, float("nan"), 3.0, float("nan")]]), 2)   # first NaN wins
@example(torch.full((2, 40), float("-inf")), 8)                            # all -inf: index 0
@example(torch.tensor([[0.0] * 9 + [2.0] + [0.0] * 5 + [2.0]]), 4)         # tie across blocks
def test_triton_argmax_is_torch_argmax(x: torch.Tensor, block: int | None) -> None:
    """The first maximum, a NaN above every number, whichever blocks the row is cut into."""
    assert torch.equal(triton_argmax(x, block), x.argmax(-1))


@needs_interpreter
def test_triton_argmax_reads_strided_and_batched_rows() -> None:
    x = torch.randn(3, 5, 80)
    assert torch.equal(triton_argmax(x, 16), x.argmax(-1))          # (3, 5) answers
    strided = torch.randn(4, 160)[:, ::2]                           # last dim not contiguous
    assert torch.equal(triton_argmax(strided, 16), strided.argmax(-1))


def test_argmax_constants_spread_a_large_vocabulary_over_programs() -> None:
    impl = registry.kernel_implementations("argmax")["triton"]
    block, _ = impl.launch_constants(torch.empty(1, 128256, device="meta"))
    assert 128256 // block >= 32    # one row reaches many multiprocessors
    assert impl.launch_constants(torch.empty(2, 100, device="meta"))[0] == 128  # one block
    with pytest.raises(ValueError, match="at most .* logits a row, found"):
        impl.launch_constants(torch.empty(1, 2**24, device="meta"))


@needs_interpreter
def test_greedy_chooser_picks_through_the_chosen_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy and sampled tokens go through the `argmax` implementation the chooser names,
    chosen once per device and dtype rather than per step."""
    x = torch.randn(3, 50)
    chosen: list[str] = []
    choose = registry.choose_kernel

    def counting(op: str, requested: str, device: torch.device, dtype: torch.dtype):
        impl = choose(op, requested, device, dtype)
        chosen.append(impl.name)
        return impl

    monkeypatch.setattr(registry, "choose_kernel", counting)
    cpu = torch.device("cpu")
    greedy = TokenChooser(SamplingParams(), 3, cpu, argmax="triton")
    assert torch.equal(greedy(x), x.argmax(-1)) and torch.equal(greedy(x * 2), x.argmax(-1))
    sampled = TokenChooser(SamplingParams(do_sample=True, seed=3), 3, cpu, argmax="triton")
    tokens = sampled(x)
    assert chosen == ["triton", "triton"]   # once per chooser
    again = TokenChooser(SamplingParams(do_sample=True, seed=3), 3, cpu)   # "auto": native here
    assert torch.equal(again(x), tokens) and chosen[-1] == "native"   # same draw, same token
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        TokenChooser(SamplingParams(), 3, cpu, argmax="fast")(x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows, vocab", [(1, 128256), (8, 128256), (64, 50265), (3, 1000)])
def test_triton_argmax_on_gpu(rows: int, vocab: int) -> None:
    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    x[:, vocab // 3] = x[:, vocab - 1] = 100.0            # a tie: the first index wins
    x[0, vocab // 2] = float("nan")                       # the NaN wins row 0
    assert torch.equal(triton_argmax(x), x.argmax(-1))
    assert torch.equal(TokenChooser(SamplingParams(), rows, x.device)(x), x.argmax(-1))
