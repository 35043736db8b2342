"""How each CompileConfig field is checked and read from the environment.

A check takes (field name, value) and returns the normalized value or raises ValueError saying
what was expected and what was found; a parser turns an FXKILN_<FIELD> string into a value.
`config_field` attaches both to a dataclass field, so that the config's identity and its
environment reading follow the field list.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from types import MappingProxyType
from typing import Any

import torch

import runtime.ops  # noqa: F401  (registers the dispatch ops and their implementations)
from passes import PASSES
from runtime.registry import AUTO, kernel_implementations, kernel_ops

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# -- reading each field from the environment (FXKILN_<FIELD>) ----------------------------------

def parse_kernels(raw: str) -> dict[str, str]:
    kernels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op, sep, impl = item.partition("=")
        if not sep:
            raise ValueError(f"expected 'op=implementation' items, found {item!r}")
        kernels[op.strip()] = impl.strip()
    return kernels


def parse_names(raw: str) -> tuple[str, ...] | None:
    """Comma-separated names; "default" is None (the field's default)."""
    if raw.strip() == "default":
        return None
    return tuple(filter(None, (part.strip() for part in raw.split(","))))


def parse_sizes(raw: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, found {raw!r}") from None


def parse_count(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"expected an integer, found {raw!r}") from None


def parse_count_or_auto(raw: str) -> int | str:
    return "auto" if raw.strip() == "auto" else parse_count(raw)


def parse_fraction(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number, found {raw!r}") from None


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0 or 1, found {raw!r}")


def parse_path(raw: str) -> str | None:
    return raw or None  # empty: no dumps


# -- checking and normalizing each field's value ---------------------------------------------

def check_kernels(name: str, value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}: expected a mapping of op name to implementation, "
                         f"found {type(value).__name__}")
    for op, impl in value.items():
        if op not in kernel_ops():
            raise ValueError(f"{name}: unknown op {op!r}; expected one of {list(kernel_ops())}")
        valid = [AUTO, *sorted(kernel_implementations(op))]
        if impl not in valid:
            raise ValueError(f"{name}[{op!r}]: unknown implementation {impl!r}; "
                             f"expected one of {valid}")
    return MappingProxyType(dict(sorted(value.items())))


def _names(name: str, value: Any, what: str) -> tuple[str, ...]:
    """A tuple or list of strings; a lone string or an unordered set is refused."""
    if isinstance(value, str):
        raise ValueError(f"{name}: expected a tuple of {what}, found the string {value!r}")
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name}: expected a tuple or list of {what} (in order), found "
                         f"{type(value).__name__} {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{name}: expected a tuple of {what}, found {item!r} in {value!r}")
    return tuple(value)


def check_passes(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    passes = _names(name, value, "pass names")
    for pass_name in passes:
        if pass_name not in PASSES:
            raise ValueError(f"{name}: unknown pass {pass_name!r}; expected names from "
                             f"{sorted(PASSES)}")
    return passes


def check_splitting_ops(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    ops = _names(name, value, "'namespace::op' names")
    for op in ops:
        namespace, sep, op_name = op.partition("::")
        if not sep or not namespace or not op_name:
            raise ValueError(f"{name}: expected 'namespace::op' names such as "
                             f"'fxkiln::attention', found {op!r}")
        if not _is_registered(namespace, op_name.split(".")[0]):
            raise ValueError(f"{name}: {op!r} is not a registered op (torch.ops.{namespace} has "
                             f"no {op_name.split('.')[0]!r}); expected registered ops such as "
                             f"'fxkiln::attention' (import the module that registers yours "
                             f"first)")
    return ops


def _is_registered(namespace: str, op_name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), op_name)
    except (AttributeError, RuntimeError):
        return False
    return True


def check_sizes(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name}: expected a tuple of positive integers, found {value!r}")
    sizes = tuple(value)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"{name}: expected positive integers, found {sizes!r}")
    return tuple(sorted(set(sizes)))


def check_device(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_PATTERN.match(value):
        raise ValueError(f"{name}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a bool, found {value!r}")
    return value


def check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, found {value!r}")
    return value


def check_count_or_auto(name: str, value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected 'auto' or an integer >= 0, found {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a fraction in (0, 1], found {value!r}")
    return float(value)


def check_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise ValueError(f"{name}: expected a directory path (str or os.PathLike), found "
                         f"{type(value).__name__} {value!r}")
    path = os.fspath(value)
    if not path:
        raise ValueError(f"{name}: expected a directory path, found the empty string (use None "
                         f"for no dumps, '.' for the working directory)")
    return path


def check_capture_failure(name: str, value: Any) -> str:
    if value not in ("raise", "eager"):
        raise ValueError(f"{name}: expected 'raise' or 'eager', found {value!r}")
    return value


def config_field(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
           check: Callable[[str, Any], Any], env: Callable[[str], Any]) -> Any:
    """A config field: its check (value -> normalized value) and its FXKILN_* parser."""
    return field(default=default, default_factory=factory, metadata={"check": check, "env": env})
