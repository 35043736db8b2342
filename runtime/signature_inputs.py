"""The inputs of a graph from Dynamo: signatures, which inputs are read in place, staging.

A Dynamo graph's inputs are the call's tensors, its SymInt sizes (plain ints at run time) and,
with nn modules inlined, every parameter and buffer. For a replay, each tensor input is one of:

- **static, declared**: parameters, buffers and tensors marked with
  `torch._dynamo.mark_static_address`. Read in place. A parameter's address is checked only in
  debug mode, where one that moved is a `StaticInputError` (checking hundreds of weights every
  call would cost more than the replay saves; without the check a graph reads the old tensor).
  The others are few and are checked at every replay like observed ones: a Hugging Face
  StaticCache marks its keys and values static, and `generate` makes a new cache per call, so
  a graph that kept reading the old one would give wrong tokens from the second call on.
- **static, observed**: a tensor whose storage stayed put from one call to the next and which
  the graph writes in place, such as a Hugging Face StaticCache's keys, values and position
  counter. Read and written in place; its address is checked at every replay (a few per layer)
  and a graph whose static input moved is dropped and captured again.
- **static, held**: a tensor the graph only reads that was the very same tensor object (not
  merely the same address) at the watched call and at the capture, and stayed put, such as an
  encoder-decoder cache's cross-attention keys and values. Read in place, its address checked
  at every replay like an observed one. A fresh per-call tensor never qualifies, even when the
  caching allocator hands it its predecessor's block (so it cannot make a graph churn).
- **copied**: everything else (ids, positions, masks, encoder outputs). Copied into a buffer of
  the graph before each replay; one that the graph writes in place is copied back after it.
- **mirrored**: a CPU tensor (not a host scalar) that a graph for a CUDA device reads. Its copy
  to the device inside the graph would sync, which a capture refuses, so the graph reads a
  device copy, copied back after a replay that writes it. The device copy is loaded before a
  replay only when the input's value differs from what the copy holds (compared on the host
  with a shadow copy, so writes that bump no version counter are seen too): a host-to-device
  copy from pageable memory waits for the device, a host comparison of a counter does not.
  A copy the graph writes though the call never writes the input (`counter.to(device)` is a
  copy in eager and the device copy itself in the graph) is loaded before every replay.

The signature of a call is what fixes its graph: the shapes of the tensor inputs other than
the declared static ones (Dynamo's guards fix those), the values of the other inputs (sizes),
and the values of host scalars (0-dim CPU tensors standing for Python numbers, which a device
graph would freeze). A graph with static shapes has one signature, the empty tuple.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class GraphInputs:
    """What the compiler knows about a Dynamo graph's inputs (indices into its arguments)."""

    declared_static: frozenset[int]    # parameters, buffers, mark_static_address tensors
    host_scalars: frozenset[int] = frozenset()  # 0-dim CPU tensors for Python scalars
    static_shapes: bool = False        # no symbolic size anywhere: a single signature
    mirrored: frozenset[int] = frozenset()  # CPU tensors read through device copies
    device: torch.device | None = None      # where the mirrors live (with `mirrored`)


@dataclass(frozen=True)
class Observation:
    """An uncaptured call of one signature: where its inputs were and which it wrote."""

    key: Hashable
    addresses: tuple[int, ...]     # data_ptr of each watched input (0: not a tensor)
    written: frozenset[int]        # indices of watched inputs the call wrote in place
    held: tuple[weakref.ref[torch.Tensor], ...] = ()  # each watched input, not kept alive


class InputPlan:
    """Per graph: which arguments make the signature, which are watched for writes."""

    def __init__(self, inputs: GraphInputs, example_args: Sequence[Any],
                 names: Sequence[str] = ()) -> None:
        self.inputs = inputs
        self.names = tuple(names) or tuple(f"input {i}" for i in range(len(example_args)))
        self.declared = inputs.declared_static
        tensors = [i for i, x in enumerate(example_args) if isinstance(x, torch.Tensor)]
        self.per_call = tuple(i for i in tensors if i not in self.declared)
        self.mirrored = inputs.mirrored
        self.device = inputs.device
        self.values = tuple(i for i, x in enumerate(example_args)
                            if not isinstance(x, torch.Tensor))
        self.host_scalars = tuple(sorted(inputs.host_scalars))
        # declared static tensors other than parameters: buffers and mark_static_address
        # tensors (a Hugging Face StaticCache marks its keys and values, and `generate` makes
        # a new cache per call), few enough to check at every replay
        self.declared_buffers = tuple(i for i in sorted(self.declared)
                                      if not isinstance(example_args[i], torch.nn.Parameter))
        # watched for in-place writes: per-call tensors and declared buffers
        self.watched = self.per_call + self.declared_buffers

    def signature(self, args: Sequence[Any]) -> Hashable:
        """The key a call's graphs are stored under (see the module docstring)."""
        scalars = tuple(args[i].item() for i in self.host_scalars)
        if self.inputs.static_shapes:
            return scalars
        return (tuple(args[i].shape for i in self.per_call),
                tuple(args[i] for i in self.values), scalars)

    def leading_size(self, args: Sequence[Any]) -> int:
        """Dim 0 of the first per-call tensor input with a dimension (the batch of a Hugging
        Face decode step); 0 when there is none."""
        for i in self.per_call:
            if args[i].dim() > 0:
                return int(args[i].shape[0])
        return 0

    def observe_before(self, args: Sequence[Any]) -> list[int]:
        return [args[i]._version for i in self.watched]

    def observation(self, key: Hashable, args: Sequence[Any], versions: list[int]) -> Observation:
        written = frozenset(i for i, version in zip(self.watched, versions)
                            if args[i]._version != version)
        return Observation(key, tuple(args[i].data_ptr() for i in self.watched), written,
                           tuple(weakref.ref(args[i]) for i in self.watched))

    def in_place(self, args: Sequence[Any], seen: Observation) -> frozenset[int]:
        """Declared static inputs, and watched ones that stayed put and were written in place
        or are the very tensor the watched call read (not host scalars or mirrors)."""
        held = seen.held or (None,) * len(self.watched)
        stayed = {i for i, address, ref in zip(self.watched, seen.addresses, held)
                  if args[i].data_ptr() == address and i not in self.mirrored
                  and (i in seen.written or (ref is not None and ref() is args[i]
                                             and i not in self.host_scalars))}
        return self.declared | frozenset(stayed)


class Mirror:
    """The device copy of one host input (see the module docstring): `buffer` is what the graph
    reads; `shadow` is a host copy of the value the buffer holds."""

    def __init__(self, index: int, value: torch.Tensor, device: torch.device | None,
                 written: bool) -> None:
        self.index, self.written = index, written
        self.buffer = value.to(device, copy=True)
        self.shadow = value.clone()
        # the graph writes the buffer though the call never wrote the host input: an op that
        # copied the host tensor (`counter.to(device)`, then `add_`) is a view of the device
        # copy, so the buffer no longer holds the shadow's value after a replay
        self.clobbered = False

    def load(self, value: torch.Tensor, force: bool = False) -> bool:
        """Refresh the device copy if `value` differs from it (always when `force`: a warm-up
        may have written the buffer; and when the graph clobbers it); whether it copied."""
        if not force and not self.clobbered and torch.equal(value, self.shadow):
            return False
        self.buffer.copy_(value)
        self.shadow.copy_(value)
        return True

    def store(self, value: torch.Tensor) -> None:
        """After a replay: what the graph wrote goes back to the host input (and the shadow)."""
        if self.written:
            value.copy_(self.buffer)
            self.shadow.copy_(value)


@dataclass(frozen=True)
class StagedInputs:
    """One signature's arguments for capture and replay: buffers for the copied inputs."""

    args: tuple[Any, ...]                             # what the graph was captured with
    copy_into: tuple[tuple[int, torch.Tensor], ...]   # (argument index, buffer) before replay
    copy_back: tuple[tuple[int, torch.Tensor], ...]   # (argument index, buffer) after replay
    checked: tuple[tuple[int, int], ...]              # (index, data_ptr) checked every replay
    declared: tuple[tuple[int, int], ...]             # parameters' (index, data_ptr): debug mode
    mirrors: tuple[Mirror, ...] = ()                  # host inputs read through device copies
    # `checked` as indices and addresses apart: one comparison per replay
    _checked_indices: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _checked_addresses: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_checked_indices", tuple(i for i, _ in self.checked))
        object.__setattr__(self, "_checked_addresses", [a for _, a in self.checked])

    def moved(self, args: Sequence[Any]) -> int | None:
        """The index of an observed static input that is not where the graph reads it."""
        if [args[i].data_ptr() for i in self._checked_indices] == self._checked_addresses:
            return None
        return next(i for i, address in self.checked if args[i].data_ptr() != address)

    def declared_moved(self, args: Sequence[Any]) -> tuple[int, int] | None:
        """(index, captured address) of a declared static input that moved (debug mode)."""
        for index, address in self.declared:
            if args[index].data_ptr() != address:
                return index, address
        return None

    def load(self, args: Sequence[Any], force: bool = False) -> None:
        """Before a replay: the copied inputs into their buffers, mirrors whose value changed
        (every mirror when `force`) to the device."""
        for index, buffer in self.copy_into:
            buffer.copy_(args[index])
        for mirror in self.mirrors:
            mirror.load(args[mirror.index], force)

    def store(self, args: Sequence[Any]) -> None:
        for index, buffer in self.copy_back:
            args[index].copy_(buffer)
        for mirror in self.mirrors:
            mirror.store(args[mirror.index])


def stage(plan: InputPlan, args: Sequence[Any], in_place: frozenset[int],
          written: frozenset[int]) -> StagedInputs:
    """Buffers (copies of this call's values, outside any graph pool) for the copied inputs."""
    staged = list(args)
    copy_into, mirrors = [], []
    for index in plan.per_call:
        if index in plan.mirrored:
            mirrors.append(Mirror(index, args[index], plan.device, index in written))
            staged[index] = mirrors[-1].buffer
        elif index not in in_place:
            staged[index] = buffer = args[index].clone()
            copy_into.append((index, buffer))
    checked = (in_place - plan.declared) | frozenset(plan.declared_buffers)
    return StagedInputs(
        args=tuple(staged), copy_into=tuple(copy_into),
        copy_back=tuple((i, b) for i, b in copy_into if i in written),
        checked=tuple((i, args[i].data_ptr()) for i in sorted(checked)),
        declared=tuple((i, args[i].data_ptr())
                       for i in sorted(plan.declared - set(plan.declared_buffers))),
        mirrors=tuple(mirrors))


def describe(plan: InputPlan, args: Sequence[Any], staged: StagedInputs | None) -> str:
    """'size 1: copied (1, 1) (1, 1, 1, 13), 6 read in place' (no staging yet: every shape)."""
    copied = ([i for i, _ in staged.copy_into] + [m.index for m in staged.mirrors]
              if staged is not None else list(plan.per_call))
    shapes = " ".join(str(tuple(args[i].shape)) for i in copied) or "nothing"
    in_place = f", {len(staged.checked)} read in place" if staged and staged.checked else ""
    return f"size {plan.leading_size(args)}: copied {shapes}{in_place}"
