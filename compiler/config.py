"""CompileConfig: the one immutable value that decides how a model is compiled.

The environment is read in exactly one place, `CompileConfig.from_env()`, and only when the
user calls it. Everything else receives a config value explicitly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

import runtime.ops  # noqa: F401  (registers the dispatch ops and their implementations)
from passes import PASSES
from runtime.registry import AUTO, kernel_implementations, kernel_ops

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
ENV_PREFIX = "FXKILN_"


@dataclass(frozen=True)
class CompileConfig:
    """How to compile a model. Immutable; validated at construction."""

    kernels: Mapping[str, str] = field(default_factory=dict)  # op -> implementation or "auto"
    passes: tuple[str, ...] | None = None                     # None = the default pipeline
    capture_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)      # token-count buckets; () = none
    device: str = "auto"                                      # auto | cpu | cuda | cuda:N
    verify: bool = False                  # check each pass: before and after agree on random inputs
    dump_dir: str | None = None           # write each graph's code here, numbered in pass order
    splitting_ops: tuple[str, ...] | None = None  # "namespace::op" names; None = attention ops
    capture_warmup_runs: int = 1          # eager runs of each piece before its capture
    capture_failure: str = "raise"        # a piece that cannot be captured: "raise" | "eager"
    simulate_capture: bool = False        # replay through the CUDA-graph simulator (any device)
    debug: bool = False                   # check static input addresses at every replay
    # slots of the runner's KV cache (whole-step decode graphs); 0 = none; "auto": CUDA sizes it
    # from a profiling run (runtime.memory), CPU takes a fixed runtime.memory.CPU_KV_CACHE_TOKENS
    kv_cache_tokens: int | str = "auto"
    gpu_memory_utilization: float = 0.9   # "auto" KV cache: fraction of device memory to fill

    def __post_init__(self) -> None:
        if not isinstance(self.kernels, Mapping):
            raise ValueError(f"kernels: expected a mapping of op name to implementation, "
                             f"found {type(self.kernels).__name__}")
        for op, impl in self.kernels.items():
            if op not in kernel_ops():
                raise ValueError(f"kernels: unknown op {op!r}; expected one of {list(kernel_ops())}")
            valid = [AUTO, *sorted(kernel_implementations(op))]
            if impl not in valid:
                raise ValueError(f"kernels[{op!r}]: unknown implementation {impl!r}; "
                                 f"expected one of {valid}")
        object.__setattr__(self, "kernels", MappingProxyType(dict(sorted(self.kernels.items()))))

        if self.passes is not None:
            if isinstance(self.passes, str):
                raise ValueError(f"passes: expected a tuple of pass names, found the string "
                                 f"{self.passes!r}")
            object.__setattr__(self, "passes", tuple(self.passes))
            for name in self.passes:
                if name not in PASSES:
                    raise ValueError(f"passes: unknown pass {name!r}; expected names from "
                                     f"{sorted(PASSES)}")

        sizes = tuple(self.capture_sizes)
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"capture_sizes: expected positive integers, found {sizes!r}")
        object.__setattr__(self, "capture_sizes", tuple(sorted(set(sizes))))

        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', "
                             f"found {self.device!r}")
        for name in ("verify", "simulate_capture", "debug"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, found {getattr(self, name)!r}")
        if self.splitting_ops is not None:
            if isinstance(self.splitting_ops, str):
                raise ValueError(f"splitting_ops: expected a tuple of 'namespace::op' names, "
                                 f"found the string {self.splitting_ops!r}")
            object.__setattr__(self, "splitting_ops", tuple(self.splitting_ops))
            for op in self.splitting_ops:
                if not isinstance(op, str) or "::" not in op:
                    raise ValueError(f"splitting_ops: expected 'namespace::op' names such as "
                                     f"'fxkiln::attention', found {op!r}")
        if not isinstance(self.capture_warmup_runs, int) or self.capture_warmup_runs < 0:
            raise ValueError(f"capture_warmup_runs: expected an integer >= 0, "
                             f"found {self.capture_warmup_runs!r}")
        if self.kv_cache_tokens != "auto" and (
                isinstance(self.kv_cache_tokens, bool) or not isinstance(self.kv_cache_tokens, int)
                or self.kv_cache_tokens < 0):
            raise ValueError(f"kv_cache_tokens: expected 'auto' or an integer >= 0, "
                             f"found {self.kv_cache_tokens!r}")
        fraction = self.gpu_memory_utilization
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0 < fraction <= 1:
            raise ValueError(f"gpu_memory_utilization: expected a fraction in (0, 1], "
                             f"found {fraction!r}")
        if self.capture_failure not in ("raise", "eager"):
            raise ValueError(f"capture_failure: expected 'raise' or 'eager', "
                             f"found {self.capture_failure!r}")

    # -- identity -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kernels": dict(self.kernels),
            "passes": None if self.passes is None else list(self.passes),
            "capture_sizes": list(self.capture_sizes),
            "device": self.device,
            "verify": self.verify,
            "dump_dir": self.dump_dir,
            "splitting_ops": None if self.splitting_ops is None else list(self.splitting_ops),
            "capture_warmup_runs": self.capture_warmup_runs,
            "capture_failure": self.capture_failure,
            "simulate_capture": self.simulate_capture,
            "debug": self.debug,
            "kv_cache_tokens": self.kv_cache_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }

    def hash(self) -> str:
        """A digest of the config that is the same in every process (for cache keys)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def replace(self, **changes: Any) -> CompileConfig:
        return CompileConfig(**{**self.to_dict(), **changes})

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
        """A config from FXKILN_* variables; the only reader of the environment in fxkiln.

        FXKILN_KERNELS="rms_norm=triton,silu_and_mul=native", FXKILN_PASSES="cleanup,..."
        (or "default"), FXKILN_CAPTURE_SIZES="1,2,4" (empty: no capture), FXKILN_DEVICE,
        FXKILN_VERIFY=0|1, FXKILN_DUMP_DIR, FXKILN_SPLITTING_OPS="fxkiln::attention,...",
        FXKILN_CAPTURE_WARMUP_RUNS, FXKILN_CAPTURE_FAILURE=raise|eager,
        FXKILN_SIMULATE_CAPTURE=0|1, FXKILN_DEBUG=0|1, FXKILN_KV_CACHE_TOKENS=auto|N,
        FXKILN_GPU_MEMORY_UTILIZATION=0.9. Any other FXKILN_* variable is an error.
        """
        env = os.environ if environ is None else environ
        parsers = {
            "KERNELS": ("kernels", _parse_kernels),
            "PASSES": ("passes", _parse_passes),
            "CAPTURE_SIZES": ("capture_sizes", _parse_sizes),
            "DEVICE": ("device", str),
            "VERIFY": ("verify", _parse_bool),
            "DUMP_DIR": ("dump_dir", str),
            "SPLITTING_OPS": ("splitting_ops", _parse_names),
            "CAPTURE_WARMUP_RUNS": ("capture_warmup_runs", _parse_count),
            "CAPTURE_FAILURE": ("capture_failure", str),
            "SIMULATE_CAPTURE": ("simulate_capture", _parse_bool),
            "DEBUG": ("debug", _parse_bool),
            "KV_CACHE_TOKENS": ("kv_cache_tokens", _parse_count_or_auto),
            "GPU_MEMORY_UTILIZATION": ("gpu_memory_utilization", _parse_fraction),
        }
        values: dict[str, Any] = {}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            suffix = key[len(ENV_PREFIX):]
            if suffix not in parsers:
                raise ValueError(f"unknown environment variable {key}; expected one of "
                                 f"{[ENV_PREFIX + s for s in parsers]}")
            name, parse = parsers[suffix]
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return cls(**values)


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


def _parse_kernels(raw: str) -> dict[str, str]:
    kernels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op, sep, impl = item.partition("=")
        if not sep:
            raise ValueError(f"expected 'op=implementation' items, found {item!r}")
        kernels[op.strip()] = impl.strip()
    return kernels


def _parse_passes(raw: str) -> tuple[str, ...] | None:
    if raw.strip() == "default":
        return None
    return tuple(filter(None, (part.strip() for part in raw.split(","))))


def _parse_sizes(raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, found {raw!r}") from None


def _parse_names(raw: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in raw.split(","))))


def _parse_count(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"expected an integer, found {raw!r}") from None


def _parse_count_or_auto(raw: str) -> int | str:
    return "auto" if raw.strip() == "auto" else _parse_count(raw)


def _parse_fraction(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number, found {raw!r}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0 or 1, found {raw!r}")
