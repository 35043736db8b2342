"""What enters `compile_model`: the model and its example inputs, checked before any work.

Compiling is for inference: a model in training mode is refused (its dropout would be traced
live and its batch norms would update their statistics). Example inputs are a tuple of
positional inputs or a dict of keyword inputs, tensors on the device compiled for, with the
dtypes the model's own `example_inputs` gives where it has one. Compiling runs the graph
(FLOP counts, verification, warm-up and capture), so `compile_model` snapshots the tensors
`model_state` names (`runtime.input_snapshot`) and puts back whatever those runs wrote.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLE_TOKENS = 8
ExampleInputs = tuple[Any, ...] | dict[str, Any]


class CompileInputError(ValueError):
    """A model or example input `compile_model` cannot compile; says what and where."""


def check_model(model: torch.nn.Module, device: torch.device) -> None:
    """The model is an eval-mode module whose parameters and buffers are on `device`."""
    if not isinstance(model, torch.nn.Module):
        raise CompileInputError(f"compile_model: expected a torch.nn.Module, found "
                                f"{type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        listed = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if
                                             len(training) > 3 else "")
        raise CompileInputError(
            f"compile_model compiles for inference, but {type(model).__name__} is in training "
            f"mode (found training=True on {listed}); call model.eval() first")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != device.type:
            raise CompileInputError(
                f"compile_model: the config compiles for {device}, but {type(model).__name__}."
                f"{name} is on {tensor.device}; move the model (model.to({str(device)!r})) or "
                f"set CompileConfig(device=...)")


def example_inputs(model: torch.nn.Module, given: Any, device: torch.device) -> ExampleInputs:
    """`given` as a tuple or dict, checked; the model's own `example_inputs` when None."""
    make = getattr(model, "example_inputs", None)
    if given is None:
        if not callable(make):
            raise CompileInputError(f"compile_model: {type(model).__name__} has no "
                                    f"example_inputs(num_tokens) method, so example inputs must "
                                    f"be given")
        given = make(DEFAULT_EXAMPLE_TOKENS)
    inputs = _as_tuple_or_dict(given)
    values = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
    for key, value in values:
        _check_value(f"example input {key!r}", value, device)
    if callable(make) and isinstance(inputs, tuple):
        _check_like_own_examples(model, inputs, make)
    return inputs


def _as_tuple_or_dict(given: Any) -> ExampleInputs:
    if isinstance(given, Mapping):
        return dict(given)
    if isinstance(given, torch.Tensor):
        return (given,)
    if isinstance(given, (str, bytes)):
        raise CompileInputError(f"compile_model: expected example_inputs as a tuple of inputs or "
                                f"a dict of keyword inputs, found the string {given!r}")
    if isinstance(given, Sequence):
        return tuple(given)
    raise CompileInputError(f"compile_model: expected example_inputs as a tuple of inputs or a "
                            f"dict of keyword inputs, found {type(given).__name__}")


def _check_value(where: str, value: Any, device: torch.device) -> None:
    """Tensors on `device` (nested in tuples, lists and dicts too); no numpy arrays."""
    if isinstance(value, torch.Tensor):
        if value.device.type != device.type:
            raise CompileInputError(f"{where}: expected a tensor on {device} (the device compiled "
                                    f"for), found one on {value.device}; move it with "
                                    f".to({str(device)!r})")
    elif type(value).__module__ == "numpy":
        raise CompileInputError(f"{where}: expected a torch.Tensor, found a numpy "
                                f"{type(value).__name__}; convert it with torch.from_numpy()")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_value(f"{where}[{key!r}]", item, device)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _check_value(f"{where}[{index}]", item, device)


def _check_like_own_examples(model: torch.nn.Module, inputs: tuple[Any, ...],
                             make: Any) -> None:
    """A model that makes its own example inputs says which inputs and dtypes it takes."""
    try:
        own = make(DEFAULT_EXAMPLE_TOKENS)
    except NotImplementedError:
        return
    if len(inputs) != len(own):
        raise CompileInputError(f"compile_model: expected {len(own)} example inputs, as "
                                f"{type(model).__name__}.example_inputs() gives, found "
                                f"{len(inputs)}")
    for index, (value, reference) in enumerate(zip(inputs, own)):
        if isinstance(reference, torch.Tensor) and (
                not isinstance(value, torch.Tensor) or value.dtype != reference.dtype
                or value.dim() != reference.dim()):
            found = (f"{value.dim()}-d {value.dtype}" if isinstance(value, torch.Tensor)
                     else type(value).__name__)
            raise CompileInputError(
                f"example input {index}: expected a {reference.dim()}-d {reference.dtype} tensor, "
                f"as {type(model).__name__}.example_inputs() gives, found {found}")


def describe_dtype_mismatch(model: torch.nn.Module, inputs: ExampleInputs) -> str | None:
    """Which floating-point input differs in dtype from the model's parameters, if one does.

    Asked only after capture failed: a model may take inputs of another dtype on purpose (and
    cast them), so a mismatch alone is no reason to refuse it.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    values = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
    for key, value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return (f"example input {key!r}: expected dtype {dtype} (the dtype of "
                    f"{type(model).__name__}'s parameters), found {value.dtype}")
    return None


def model_state(model: torch.nn.Module, inputs: ExampleInputs) -> list[Any]:
    """The tensors compiling must leave as they were: the model's buffers and the inputs."""
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    flat, _ = torch.utils._pytree.tree_flatten(values)
    return [*model.buffers(), *flat]
