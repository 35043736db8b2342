"""Every Triton kernel compiles for the H200 (sm_90) at the code's launch choices for the
models' decode shapes, without spilling to local memory and with 16-byte loads where the bytes
are (`tests/kernels/sm90_compile.py`, run in
a process of its own: this one jitted the kernels for the interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime.kernels import triton_kernels

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(triton_kernels.triton_jit is None, reason="needs Triton")


@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             environment.get("PYTHONPATH")]))
    try:
        import triton
    except ModuleNotFoundError:
        pytest.skip("needs Triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("Triton's bundled ptxas/cuobjdump are missing")
    process = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile"], cwd=ROOT,
                             env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills(compiled: dict[str, Any]) -> None:
    kinds = {label.split()[0] for label in compiled}
    assert kinds == {"attention", "reduce", "add", "rotary", "gemv", "varlen", "argmax"}
    failed = {label: result for label, result in compiled.items()
              if "error" in result or result["stack"] > 0}
    assert not failed, failed
    assert all(result["registers"] <= 255 for result in compiled.values())
    # the PTX's 16-byte loads are the machine code's: where the SASS was read (one
    # configuration of each kernel function), it has them where the PTX has them
    disassembled = {label: result for label, result in compiled.items()
                    if "sass_vector_loads" in result}
    assert len(disassembled) == 8  # attention, reduce, norm, rotary, gemv, varlen, argmax x2
    assert all((result["sass_vector_loads"] > 0) == (result["vector_loads"] > 0)
               and result["sass_vector_loads"] >= result["vector_loads"]
               for result in disassembled.values()), disassembled
    # the streams that carry the bytes (weights; cached K/V; rows) move 16 bytes a load
    unvectorized = [label for label, result in compiled.items() if result["vector_loads"] == 0
                    and not label.startswith(("reduce", "rotary", "argmax combine"))]
    assert not unvectorized, unvectorized
