from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from compiler import CompileConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"capture_size": (1, 2)}, "unknown CompileConfig field(s) ['capture_size']; expected names from"),
    ({"kernels": {"group_norm": "native"}}, "unknown op 'group_norm'; expected one of ["),
    ({"kernels": {"rms_norm": "cudnn"}}, "unknown implementation 'cudnn'; expected one of ['auto'"),
    ({"passes": ("cleanup", "fuse_everything")}, "unknown pass 'fuse_everything'; expected names from"),
    ({"passes": "cleanup"}, "expected a tuple of pass names"),
    ({"device": "mps"}, "expected 'auto', 'cpu', 'cuda' or 'cuda:N', found 'mps'"),
    ({"capture_sizes": (0, 4)}, "expected positive integers"),
    ({"verify": "yes"}, "expected a bool"),
])
def test_bad_config_names_the_valid_choices(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        CompileConfig(**kwargs)
    assert fragment in str(info.value)


def test_valid_choices_are_listed_in_the_error() -> None:
    with pytest.raises(ValueError) as info:
        CompileConfig(kernels={"rms_norm": "nope"})
    assert "'native'" in str(info.value)
    with pytest.raises(ValueError) as info:
        CompileConfig(passes=("nope",))
    assert "'cleanup'" in str(info.value)


def test_config_is_frozen_and_normalized() -> None:
    config = CompileConfig(capture_sizes=[8, 1, 4, 4], kernels={"rms_norm": "native"})
    assert config.capture_sizes == (1, 4, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device = "cpu"  # type: ignore[misc]  # the point of the test
    with pytest.raises(TypeError):
        config.kernels["rms_norm"] = "auto"  # type: ignore[index]  # read-only mapping


def test_hash_depends_on_every_field() -> None:
    base = CompileConfig()
    variants = [base.replace(kernels={"rms_norm": "native"}), base.replace(passes=("cleanup",)),
                base.replace(capture_sizes=(1,)), base.replace(device="cpu"),
                base.replace(verify=True), base.replace(dump_dir="/tmp/x")]
    hashes = {base.hash(), *(v.hash() for v in variants)}
    assert len(hashes) == 1 + len(variants)
    assert CompileConfig(kernels={"rms_norm": "native", "silu_and_mul": "native"}).hash() == \
        CompileConfig(kernels={"silu_and_mul": "native", "rms_norm": "native"}).hash()


def test_hash_is_the_same_in_another_process() -> None:
    config = CompileConfig(kernels={"rms_norm": "native"}, capture_sizes=(1, 8), device="cpu")
    code = ("from compiler import CompileConfig;"
            "print(CompileConfig(kernels={'rms_norm': 'native'}, capture_sizes=(8, 1),"
            " device='cpu').hash())")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert result.stdout.strip() == config.hash()


def test_from_env_reads_fxkiln_variables() -> None:
    config = CompileConfig.from_env({
        "FXKILN_KERNELS": "rms_norm=native, silu_and_mul=auto",
        "FXKILN_PASSES": "cleanup",
        "FXKILN_CAPTURE_SIZES": "4,1",
        "FXKILN_DEVICE": "cpu",
        "FXKILN_VERIFY": "1",
        "HOME": "/root",
    })
    assert dict(config.kernels) == {"rms_norm": "native", "silu_and_mul": "auto"}
    assert config.passes == ("cleanup",)
    assert config.capture_sizes == (1, 4)
    assert config.device == "cpu" and config.verify is True
    assert CompileConfig.from_env({"FXKILN_CAPTURE_SIZES": ""}).capture_sizes == ()
    assert CompileConfig.from_env({}) == CompileConfig()


@pytest.mark.parametrize("environ, fragment", [
    ({"FXKILN_KERNEL": "rms_norm=native"}, "unknown environment variable FXKILN_KERNEL"),
    ({"FXKILN_KERNELS": "rms_norm"}, "expected 'op=implementation' items"),
    ({"FXKILN_CAPTURE_SIZES": "1,two"}, "expected comma-separated integers"),
    ({"FXKILN_VERIFY": "maybe"}, "expected 0 or 1"),
])
def test_from_env_rejects_what_it_cannot_use(environ: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        CompileConfig.from_env(environ)


def test_environment_is_read_only_by_from_env() -> None:
    offenders = []
    for folder in ("compiler", "passes", "runtime", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if ("os.environ" in text or "os.getenv" in text) and path != ROOT / "compiler/config.py":
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
