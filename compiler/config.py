"""CompileConfig: the one immutable value that decides how a model is compiled.

The environment is read in exactly one place, `CompileConfig.from_env()`, and only when the
user calls it. Everything else receives a config value explicitly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from compiler.config_fields import (
    check_bool,
    check_capture_failure,
    check_count,
    check_count_or_auto,
    check_device,
    check_fraction,
    check_kernels,
    check_passes,
    check_path,
    check_sizes,
    check_splitting_ops,
    config_field,
    parse_bool,
    parse_count,
    parse_count_or_auto,
    parse_fraction,
    parse_kernels,
    parse_names,
    parse_path,
    parse_sizes,
)

ENV_PREFIX = "FXKILN_"


@dataclass(frozen=True)
class CompileConfig:
    """How to compile a model. Immutable; validated at construction.

    Identity (`to_dict`, `hash`, `replace`, `from_env`) comes from the field list: a new field
    needs only its line here, with its check and its environment parser.
    """

    # op -> implementation or "auto"
    kernels: Mapping[str, str] = config_field(factory=dict, check=check_kernels, env=parse_kernels)
    # None = the default pipeline; else pass names in order
    passes: tuple[str, ...] | None = config_field(None, check=check_passes, env=parse_names)
    # token-count buckets; () = none
    capture_sizes: tuple[int, ...] = config_field((1, 2, 4, 8, 16, 32), check=check_sizes,
                                                  env=parse_sizes)
    # serving models (fxkiln's own, compile_model(hf)): token-count buckets for prefill steps
    # above the largest capture size: piecewise graphs, attention and the LM head eager (the
    # head on the rows a step reads); () = prefill steps past capture_sizes run eagerly
    prefill_capture_sizes: tuple[int, ...] = config_field(
        (48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048), check=check_sizes,
        env=parse_sizes)
    # auto | cpu | cuda | cuda:N
    device: str = config_field("auto", check=check_device, env=str)
    # check each pass: before and after agree on random inputs (outputs and writes)
    verify: bool = config_field(False, check=check_bool, env=parse_bool)
    # write each graph's code here, numbered in pass order
    dump_dir: str | None = config_field(None, check=check_path, env=parse_path)
    # registered "namespace::op" names; None = the attention ops
    splitting_ops: tuple[str, ...] | None = config_field(None, check=check_splitting_ops,
                                                         env=parse_names)
    # eager runs of each piece before its capture
    capture_warmup_runs: int = config_field(1, check=check_count, env=parse_count)
    # a piece that cannot be captured: "raise" | "eager"
    capture_failure: str = config_field("raise", check=check_capture_failure, env=str)
    # replay through the CUDA-graph simulator (any device)
    simulate_capture: bool = config_field(False, check=check_bool, env=parse_bool)
    # check static input addresses at every replay
    debug: bool = config_field(False, check=check_bool, env=parse_bool)
    # slots of the runner's KV cache (whole-step decode graphs); 0 = none; "auto": CUDA sizes it
    # from a profiling run after capture (runtime.memory), CPU takes a fixed
    # runtime.memory.CPU_KV_CACHE_TOKENS
    kv_cache_tokens: int | str = config_field("auto", check=check_count_or_auto,
                                              env=parse_count_or_auto)
    # "auto" KV cache: the fraction of device memory that weights, graphs, activations and the
    # cache may fill together (vLLM's gpu_memory_utilization)
    gpu_memory_utilization: float = config_field(0.9, check=check_fraction, env=parse_fraction)

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            object.__setattr__(self, spec.name,
                               spec.metadata["check"](spec.name, getattr(self, spec.name)))

    # -- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain JSON values (mappings as dicts, tuples as lists)."""
        return {spec.name: _plain(getattr(self, spec.name)) for spec in dataclasses.fields(self)}

    def hash(self) -> str:
        """A digest of the config that is the same in every process (for cache keys)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def replace(self, **changes: Any) -> CompileConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompileConfig:
        return cls(**values)

    # -- derived --------------------------------------------------------------------------
    def resolved_device(self) -> torch.device:
        """The device to compile for; "auto" is CUDA when present, else CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} was asked for, but CUDA is not available; "
                             f"use 'cpu' or 'auto'")
        return device

    # -- the environment --------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CompileConfig:
        """A config from FXKILN_<FIELD> variables; the only reader of the environment in fxkiln.

        FXKILN_KERNELS="rms_norm=triton,silu_and_mul=native", FXKILN_PASSES="cleanup,..."
        (or "default"), FXKILN_CAPTURE_SIZES="1,2,4" (empty: no capture),
        FXKILN_PREFILL_CAPTURE_SIZES="64,128" (empty: none), FXKILN_DEVICE, FXKILN_VERIFY=0|1,
        FXKILN_DUMP_DIR (empty: none), FXKILN_SPLITTING_OPS="fxkiln::attention,..." (or
        "default"), FXKILN_CAPTURE_WARMUP_RUNS,
        FXKILN_CAPTURE_FAILURE=raise|eager, FXKILN_SIMULATE_CAPTURE=0|1, FXKILN_DEBUG=0|1,
        FXKILN_KV_CACHE_TOKENS=auto|N, FXKILN_GPU_MEMORY_UTILIZATION=0.9. Any other FXKILN_*
        variable is an error.
        """
        env = os.environ if environ is None else environ
        parsers = {ENV_PREFIX + spec.name.upper(): spec for spec in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            if key not in parsers:
                raise ValueError(f"unknown environment variable {key}; expected one of "
                                 f"{list(parsers)}")
            spec = parsers[key]
            try:
                values[spec.name] = spec.metadata["env"](raw)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def _reject_unknown_fields(init: Any) -> Any:
    names = [f.name for f in dataclasses.fields(CompileConfig)]

    def checked_init(self: CompileConfig, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown CompileConfig field(s) {unknown}; expected names from {names}")
        init(self, *args, **kwargs)

    checked_init.__doc__ = init.__doc__
    return checked_init


CompileConfig.__init__ = _reject_unknown_fields(CompileConfig.__init__)  # type: ignore[method-assign]  # unknown keys must be ValueError, not TypeError
