"""Loading Hugging Face checkpoint tensors into a project model, strictly.

Checkpoint names map to parameter names one to one, except for stacked parameters: the model's
`stacked_params_mapping` says, e.g., that `...self_attn.k_proj.weight` is shard "k" of
`...self_attn.qkv_proj.weight`. Tied parameters (one Parameter under several names, such as a
tied LM head) load from any of their names. Every checkpoint tensor must land somewhere, every
parameter (every shard of a stacked one) must be loaded, and shapes must match: otherwise
`WeightLoadError` names the tensor. Only safetensors files are read; never pickle.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from models.base import ProjectModel
from models.errors import WeightLoadError
from models.layers.params import get_weight_loader

logger = logging.getLogger(__name__)

ShardId = str | int | None


def iterate_safetensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every `*.safetensors` file in `folder`.

    The files' headers are read first, here: no files, or a tensor in two files (which of the
    two is meant is unknown), is an error before any tensor is read.
    """
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: expected *.safetensors files (save_pretrained with "
                                f"safe_serialization), found none; pickle checkpoints are not read")
    file_of: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                if name in file_of:
                    raise WeightLoadError(f"checkpoint tensor {name!r} is in both "
                                          f"{file_of[name].name} and {file.name} of {folder}; "
                                          f"expected each tensor in one file", name)
                file_of[name] = file
    return _read_tensors(files)


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)


def load_weights(model: ProjectModel, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load every `(checkpoint name, full tensor)` into `model`, sharding for its TP rank."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied params: every name
    mapping = model.stacked_params_mapping
    loaded: dict[int, set[ShardId]] = {}
    unexpected: list[str] = []
    for name, tensor in weights:
        target = _target(name, params, mapping)
        if target is None:
            unexpected.append(name)
            continue
        param_name, shard_id = target
        param = params[param_name]
        try:
            with torch.no_grad():
                get_weight_loader(param)(param, tensor, shard_id)
        except ValueError as error:
            shard = "" if shard_id is None else f", shard {shard_id!r}"
            raise WeightLoadError(f"checkpoint tensor {name!r} (into parameter {param_name!r}"
                                  f"{shard}): {error}", name) from error
        loaded.setdefault(id(param), set()).add(shard_id)
        logger.debug("loaded %s -> %s (shard %s)", name, param_name, shard_id)
    missing = _missing(params, loaded, mapping)
    if unexpected or missing:
        raise WeightLoadError(_describe(unexpected, missing, params, mapping),
                              (unexpected or missing)[0])


def _target(name: str, params: dict[str, nn.Parameter],
            mapping: tuple[tuple[str, str, str | int], ...]) -> tuple[str, ShardId] | None:
    """The parameter name and shard id a checkpoint tensor loads into; None if none takes it."""
    parts = name.split(".")
    for fused, part, shard_id in mapping:
        if part in parts:
            stacked = ".".join(fused if piece == part else piece for piece in parts)
            if stacked in params:
                return stacked, shard_id
    return (name, None) if name in params else None


def _missing(params: dict[str, nn.Parameter], loaded: dict[int, set[ShardId]],
             mapping: tuple[tuple[str, str, str | int], ...]) -> list[str]:
    """Checkpoint names of every parameter shard nothing was loaded into."""
    names_of: dict[int, list[str]] = {}
    for param_name, param in params.items():
        names_of.setdefault(id(param), []).append(param_name)
    missing: list[str] = []
    for param_id, aliases in names_of.items():
        done = loaded.get(param_id, set())
        if None in done:  # loaded whole (a checkpoint that already stacks the parts)
            continue
        missing += [checkpoint_name for shard_id, checkpoint_name in _shard_names(aliases[0], mapping)
                    if shard_id not in done]
    return missing


def _describe(unexpected: list[str], missing: list[str], params: dict[str, nn.Parameter],
              mapping: tuple[tuple[str, str, str | int], ...]) -> str:
    problems = []
    if unexpected:
        expected = [name for name, _ in _checkpoint_names(params, mapping)]
        hints = {name: difflib.get_close_matches(name, expected, n=1) for name in unexpected}
        listed = ", ".join(f"{name!r}" + (f" (nearest expected name: {hint[0]!r})" if hint else "")
                           for name, hint in hints.items())
        problems.append(f"unexpected checkpoint tensor(s) that no parameter takes: {listed}")
    if missing:
        problems.append(f"missing checkpoint tensor(s) that the model needs: {missing}")
    return "; ".join(problems)


def _checkpoint_names(params: dict[str, nn.Parameter],
                      mapping: tuple[tuple[str, str, str | int], ...]) -> list[tuple[str, ShardId]]:
    """(checkpoint name, shard id) of everything the model could load."""
    return [(checkpoint_name, shard_id) for param_name in params
            for shard_id, checkpoint_name in _shard_names(param_name, mapping)]


def _shard_names(param_name: str, mapping: tuple[tuple[str, str, str | int], ...]
                 ) -> list[tuple[ShardId, str]]:
    """(shard id, checkpoint name) pairs that together fill `param_name`."""
    parts = param_name.split(".")
    shards = [(shard_id, ".".join(part if piece == fused else piece for piece in parts))
              for fused, part, shard_id in mapping if fused in parts]
    return shards or [(None, param_name)]
