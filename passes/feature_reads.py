"""How a projection's output features are read: the readers qkv_split understands.

A reader takes parts of the last (feature) dimension of a tensor: a split or chunk followed by
getitems, a narrow, or a slice. Views that keep the last dimension whole may stand between the
projection and its readers; `resized_view_args` replays such a view on a narrower tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from passes.fx_utils import (
    call_arg,
    is_call,
    is_dim,
    is_getitem,
    is_view_like,
    known_equal,
    tensor_meta,
)

FEATURE_READERS = {
    "split": "x.split(size or sizes, dim=-1) / torch.split, then getitem(int)",
    "chunk": "x.chunk(n, dim=-1) / torch.chunk, then getitem(int)",
    "narrow": "x.narrow(-1, start, length) / torch.narrow",
    "slice": "x[..., a:b] (a unit-step slice of the last dimension)",
}

Range = tuple[int, int]


@dataclass
class FeatureRead:
    """One reader of the projection's output and the feature ranges of its parts."""

    reader: fx.Node
    views: tuple[fx.Node, ...]    # feature-preserving views between the projection and reader
    kind: str                     # "split", "narrow" or "slice"
    parts: list[Range]            # [start, stop) of each part, in features
    used: dict[int, list[fx.Node]] = field(default_factory=dict)  # part -> nodes standing for it

    def used_parts(self) -> list[tuple[int, Range]]:
        return [(index, self.parts[index]) for index in sorted(self.used)]


def keeps_features(view: fx.Node, source: fx.Node, features: int) -> bool:
    if not is_view_like(view) or not view.args or view.args[0] is not source:
        return False
    out, inp = tensor_meta(view), tensor_meta(source)
    if out is None or inp is None or out.dim() == 0 or not known_equal(out.shape[-1], features):
        return False
    return known_equal(inp.shape[-1], features) and resized_view_args(view, source, 1) is not None


def resized_view_args(view: fx.Node, source: fx.Node, size: int) -> tuple[Any, ...] | None:
    """`view`'s args with `source` in place of its input and `size` features, if expressible."""
    if view.target in ("view", "reshape", torch.Tensor.view, torch.Tensor.reshape, torch.reshape):
        shape = view.args[1:]
        packed = len(shape) == 1 and isinstance(shape[0], (tuple, list))
        dims = tuple(shape[0]) if packed else tuple(shape)
        if not dims or isinstance(dims[-1], fx.Node) or not isinstance(dims[-1], int):
            return None
        dims = (*dims[:-1], dims[-1] if dims[-1] == -1 else size)
        return (source, dims) if packed else (source, *dims)
    return (source, *view.args[1:])  # flatten / contiguous: the last dimension is untouched


def feature_read(reader: fx.Node, views: tuple[fx.Node, ...], features: int,
                  live: set[fx.Node]) -> FeatureRead | None:
    """How `reader` reads the feature dimension, or None if it reads it whole or unknowably."""
    value = tensor_meta(reader.args[0]) if reader.args else None
    if value is None:
        return None
    last = value.dim() - 1
    if is_call(reader, ("split", "chunk"), (torch.split, torch.Tensor.split, torch.chunk)):
        if not is_dim(call_arg(reader, 2, ("dim",), 0), value.dim(), last):
            return None
        size = call_arg(reader, 1, ("split_size_or_sections", "split_size", "chunks", "sections"))
        parts = _split_parts(size, features, chunk=reader.target in ("chunk", torch.chunk))
        getitems = list(reader.users)
        if parts is None or not all(is_getitem(g) and isinstance(g.args[1], int) for g in getitems):
            return None
        read = FeatureRead(reader, views, "split", parts)
        for getitem in getitems:
            if getitem in live:
                read.used.setdefault(getitem.args[1] % len(parts), []).append(getitem)
        return read
    if is_call(reader, ("narrow",), (torch.narrow, torch.Tensor.narrow)):
        dim, start, length = (call_arg(reader, i, (name,)) for i, name in
                              ((1, "dim"), (2, "start"), (3, "length")))
        if not is_dim(dim, value.dim(), last) or not _are_ints(start, length):
            return None
        start = start + features if start < 0 else start
        return FeatureRead(reader, views, "narrow", [(start, start + length)], {0: [reader]})
    if is_getitem(reader) and _indexes_last_dim(reader.args[1], value.dim()):
        item = _index_items(reader.args[1])[-1]
        if not isinstance(item, slice) or item.step not in (None, 1) or \
                not all(v is None or _are_ints(v) for v in (item.start, item.stop)):
            return None
        start, stop, _ = item.indices(features)
        return FeatureRead(reader, views, "slice", [(start, max(start, stop))], {0: [reader]})
    return None


def _are_ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _split_parts(size: Any, features: int, chunk: bool) -> list[Range] | None:
    if chunk:
        if not _are_ints(size) or size < 1:
            return None
        size = -(-features // size)  # torch.chunk: parts of ceil(features / chunks)
    if _are_ints(size):
        if size < 1:
            return None
        sizes = [min(size, features - start) for start in range(0, features, size)]
    elif isinstance(size, (list, tuple)) and _are_ints(*size) and sum(size) == features:
        sizes = list(size)
    else:
        return None
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _index_items(index: Any) -> tuple[Any, ...]:
    return index if isinstance(index, tuple) else (index,)


def _indexes_last_dim(index: Any, ndim: int) -> bool:
    """The index's last entry applies to the last dimension (the only case understood)."""
    items = _index_items(index)
    if not all(isinstance(i, slice) or i is Ellipsis or _are_ints(i) for i in items):
        return False  # None (new axes) or tensor indices move dimensions around
    if Ellipsis in items:
        return items.count(Ellipsis) == 1 and items[-1] is not Ellipsis
    return len(items) == ndim


def shifted_index(index: Any, span: Range, start: int, stop: int) -> Any:
    """`index` (a feature slice) made relative to `span`; None if it then selects everything."""
    items = list(_index_items(index))
    width = span[1] - span[0]
    items[-1] = slice(start - span[0] or None, None if stop - span[0] == width else stop - span[0])
    if all(item is Ellipsis or item == slice(None) for item in items):
        return None
    return tuple(items) if isinstance(index, tuple) else items[0]
