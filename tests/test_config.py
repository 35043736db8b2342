from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import CompileConfig
from passes import PASSES
from runtime.registry import kernel_implementations, kernel_ops

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
    ({"passes": {"cleanup", "qkv_split"}}, "passes: expected a tuple or list of pass names (in "
                                           "order), found set"),
    ({"dump_dir": 3}, "dump_dir: expected a directory path (str or os.PathLike), found int 3"),
    ({"dump_dir": ""}, "dump_dir: expected a directory path, found the empty string"),
    ({"splitting_ops": ("fxkiln::atention",)}, "splitting_ops: 'fxkiln::atention' is not a "
                                               "registered op"),
    ({"splitting_ops": ("attention",)}, "expected 'namespace::op' names"),
    ({"capture_warmup_runs": True}, "capture_warmup_runs: expected an integer >= 0, found True"),
    ({"capture_sizes": 4}, "capture_sizes: expected a tuple of positive integers, found 4"),
    ({"kv_cache_tokens": -1}, "kv_cache_tokens: expected 'auto' or an integer >= 0, found -1"),
    ({"kv_cache_tokens": "max"}, "kv_cache_tokens: expected 'auto' or an integer >= 0, found 'max'"),
    ({"gpu_memory_utilization": 0}, "gpu_memory_utilization: expected a fraction in (0, 1], found 0"),
    ({"gpu_memory_utilization": True}, "gpu_memory_utilization: expected a fraction in (0, 1]"),
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


def test_dump_dir_takes_a_path_and_hashes() -> None:
    config = CompileConfig(dump_dir=Path("/tmp/graphs"))
    assert config.dump_dir == "/tmp/graphs"
    assert config.hash() == CompileConfig(dump_dir="/tmp/graphs").hash()


def test_kernel_order_does_not_change_the_hash() -> None:
    assert CompileConfig(kernels={"rms_norm": "native", "silu_and_mul": "native"}).hash() == \
        CompileConfig(kernels={"silu_and_mul": "native", "rms_norm": "native"}).hash()


def _kernel_choices() -> st.SearchStrategy[dict[str, str]]:
    return st.sampled_from(sorted(kernel_ops())).flatmap(
        lambda op: st.sampled_from(sorted(kernel_implementations(op))).map(lambda impl: {op: impl}))


# Every field: a strategy for values other than its default, and how FXKILN_<FIELD> spells one.
NON_DEFAULT: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], str]]] = {
    "kernels": (_kernel_choices(), lambda v: ",".join(f"{k}={i}" for k, i in v.items())),
    "passes": (st.lists(st.sampled_from(sorted(PASSES)), max_size=4).map(tuple), ",".join),
    "capture_sizes": (st.lists(st.integers(1, 64), max_size=4, unique=True)
                      .map(lambda v: tuple(sorted(v))).filter(lambda v: v != (1, 2, 4, 8, 16, 32)),
                      lambda v: ",".join(map(str, v))),
    "prefill_capture_sizes": (st.lists(st.integers(1, 4096), max_size=4, unique=True)
                              .map(lambda v: tuple(sorted(v))), lambda v: ",".join(map(str, v))),
    "device": (st.sampled_from(["cpu", "cuda", "cuda:1"]), str),
    "verify": (st.just(True), lambda v: "1"),
    "dump_dir": (st.text("abc/_", min_size=1, max_size=8), str),
    "splitting_ops": (st.lists(st.sampled_from(["fxkiln::attention", "aten::mm",
                                                "aten::scaled_dot_product_attention"]),
                               max_size=3).map(tuple), ",".join),
    "capture_warmup_runs": (st.integers(0, 5).filter(lambda v: v != 1), str),
    "capture_failure": (st.just("eager"), str),
    "simulate_capture": (st.just(True), lambda v: "1"),
    "debug": (st.just(True), lambda v: "1"),
    "kv_cache_tokens": (st.integers(0, 1 << 20), str),
    "gpu_memory_utilization": (st.floats(0.01, 1.0).filter(lambda v: v != 0.9), repr),
}


def test_every_field_has_a_non_default_strategy() -> None:
    """A field added to CompileConfig must join the identity property below."""
    assert sorted(NON_DEFAULT) == sorted(f.name for f in dataclasses.fields(CompileConfig))


@settings(max_examples=25)
@given(values=st.fixed_dictionaries({name: strategy for name, (strategy, _) in NON_DEFAULT.items()}))
def test_property_every_field_is_part_of_the_identity(values: dict[str, Any]) -> None:
    default, config = CompileConfig(), CompileConfig(**values)
    for name, value in values.items():
        alone = CompileConfig(**{name: value})
        assert alone.hash() != default.hash(), name
        assert config.replace(**{name: getattr(default, name)}).hash() != config.hash(), name
        assert default.replace(**{name: value}) == alone
        other = "debug" if name != "debug" else "verify"
        changed = alone.replace(**{other: not getattr(alone, other)})
        assert getattr(changed, name) == getattr(alone, name)  # replace() keeps the rest
    assert CompileConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    environ = {f"FXKILN_{name.upper()}": spell(values[name])
               for name, (_, spell) in NON_DEFAULT.items()}
    from_env = CompileConfig.from_env(environ)
    assert from_env == config and from_env.hash() == config.hash()


@pytest.mark.slow
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
