"""The lifting passes and the ops they write are registered, ordered and listed by the CLI."""
from __future__ import annotations

import pytest

from compiler import cli
from passes import DEFAULT_PIPELINE, PASSES

LIFTING = ("lift_rms_norm", "lift_add_rms_norm", "lift_layer_norm", "lift_add_layer_norm",
           "lift_act_and_mul", "lift_rotary", "lift_cache_attention")


def test_lifting_passes_run_after_qkv_fuse_and_before_kernel_choice() -> None:
    order = {name: index for index, name in enumerate(DEFAULT_PIPELINE)}
    assert set(LIFTING) <= set(PASSES) and set(LIFTING) <= set(order)
    # act-and-mul reads the halves of the gate_up projection qkv_fuse makes
    assert order["qkv_fuse"] < order["lift_act_and_mul"]
    # the residual add fuses into the norms lift_rms_norm writes
    assert order["lift_rms_norm"] < order["lift_add_rms_norm"]
    assert order["lift_layer_norm"] < order["lift_add_layer_norm"]
    assert max(order[name] for name in LIFTING) < order["kernel_choice"]
    # a boolean mask is read as it is by cache_attention, converted once for the SDPA calls left
    assert order["lift_cache_attention"] < order["sdpa_masks"]


def test_cli_lists_the_lifting_passes_and_the_ops_they_write(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["passes"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name} " in listed for name in LIFTING)
    assert cli.main(["kernels"]) == 0
    kernels = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    for op in ("gelu_and_mul", "rotary_cos_sin", "cache_attention"):
        assert kernels[op] == ["native,", "triton"]
