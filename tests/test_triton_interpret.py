"""The suite's interpreter set-up (tests/triton_interpret.py): one patch of triton.language per
launch, whatever the kernel's helpers, and the kernel's results unchanged; overflow checks skipped
only where Triton would discard them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.kernels import triton_kernels

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
pytestmark = pytest.mark.skipif(not triton_kernels.interpreter_active(),
                                reason="needs Triton's interpreter (CPU)")


@triton.jit
def twice(x):
    return x * 2


@triton.jit
def kernel(out_ptr, x_ptr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    value = tl.load(x_ptr + offsets)
    for _ in tl.static_range(STEPS):
        value = twice(value) + 1
    tl.store(out_ptr + offsets, value)


def test_a_helper_called_in_a_loop_patches_the_language_once_per_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "once_per_launch", False)  # conftest installed it
    patched: list[object] = []
    patch_builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin",
                        lambda package, *rest: patched.append(package) or
                        patch_builtin(package, *rest))
    x = torch.arange(8, dtype=torch.float32)
    out = torch.empty_like(x)
    kernel[(2,)](out, x, BLOCK=4, STEPS=3)
    expected = x
    for _ in range(3):
        expected = expected * 2 + 1
    assert torch.equal(out, expected)
    once = len(patched)  # the launch's modules: tl, tl.tensor, tl.math, descriptors
    assert once == 4
    kernel[(2,)](out, x, BLOCK=4, STEPS=3)
    assert len(patched) == 2 * once  # each launch patches again; its helper calls do not


@triton.jit
def scale(out_ptr, x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets) * 4)  # an int32 multiply


def test_overflow_checks_are_skipped_only_where_triton_discards_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sanitizing on and debug off, Triton computes each overflow check and drops it (an
    overflowing multiply wraps, no error): the set-up's skip gives the same values. With
    debug on the check fires, and the set-up would leave sanitizing on."""
    from triton.runtime import interpreter

    from tests.triton_interpret import skip_discarded_overflow_checks

    builder = interpreter.interpreter_builder
    assert not builder.options.sanitize_overflow and not builder.options.debug  # conftest
    x = torch.tensor([1, -3, 2**29, 2**30], dtype=torch.int32)  # the last two overflow
    skipped, checked = torch.empty_like(x), torch.empty_like(x)
    scale[(1,)](skipped, x, BLOCK=4)
    monkeypatch.setattr(builder, "options",
                        dataclasses.replace(builder.options, sanitize_overflow=True))
    scale[(1,)](checked, x, BLOCK=4)
    assert torch.equal(checked, skipped) and skipped[:2].tolist() == [4, -12]
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    with pytest.raises(Exception, match="overflow"):
        scale[(1,)](checked, x, BLOCK=4)
    assert not skip_discarded_overflow_checks()
    assert builder.options.sanitize_overflow  # left as it was
