"""PassManager: runs passes in order and owns linting, timing, dumps, verification and counters."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from passes.base import GraphPass
from passes.fx_utils import constant_tensor
from passes.writes import written_args

logger = logging.getLogger(__name__)


class PassError(RuntimeError):
    """A pass raised; the message names it and the passes that ran before it."""


class PassVerificationError(AssertionError):
    """A pass changed what the graph computes."""


@dataclass
class PassRecord:
    """What one pass did."""

    name: str
    matches: int
    modified: bool
    seconds: float


class PassManager:
    """An ordered list of passes and what happens around each one.

    `refresh` re-runs shape propagation after a pass that modified the graph, so the next pass
    sees `meta["val"]` on new nodes. With `dump_dir`, the graph's code is written before the
    first pass (000) and after each pass (001, 002, ...). With `verify_inputs`, the graph before
    and after each pass is run on those inputs and the outputs must agree.
    """

    def __init__(
        self,
        passes: Sequence[GraphPass],
        *,
        refresh: Callable[[fx.GraphModule], None] | None = None,
        dump_dir: str | Path | None = None,
        verify_inputs: Sequence[Any] | None = None,
        verify_context: Callable[[], Any] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.refresh = refresh
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.verify_inputs = verify_inputs
        self.verify_context = verify_context

    def __call__(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, list[PassRecord]]:
        records: list[PassRecord] = []
        self._dump(gm, 0, "captured")
        for index, graph_pass in enumerate(self.passes, start=1):
            before = _copy_graph_module(gm) if self.verify_inputs is not None else None
            start = time.perf_counter()
            try:
                result = graph_pass(gm)
                gm = result.graph_module
                gm.graph.lint()
                if result.modified and self.refresh is not None:
                    self.refresh(gm)
            except Exception as exc:
                ran = [r.name for r in records] or ["none"]
                raise PassError(f"pass {graph_pass.name!r} failed: {type(exc).__name__}: {exc} "
                                f"(passes run before it: {', '.join(ran)})") from exc
            seconds = time.perf_counter() - start
            records.append(PassRecord(graph_pass.name, result.matches, result.modified, seconds))
            logger.debug("pass %s: %d matches in %.3f s", graph_pass.name, result.matches, seconds)
            self._dump(gm, index, graph_pass.name)
            if before is not None and result.modified:
                self._verify(graph_pass.name, before, gm)
        return gm, records

    def _dump(self, gm: fx.GraphModule, index: int, label: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        code = gm.print_readable(print_output=False)
        (self.dump_dir / f"{index:03d}_{label}.py").write_text(code)

    def _verify(self, name: str, before: fx.GraphModule, after: fx.GraphModule) -> None:
        """Both graphs run from the same state; their outputs and what they write must agree."""
        assert self.verify_inputs is not None
        state = {**written_state(before, self.verify_inputs),
                 **written_state(after, self.verify_inputs)}
        initial = {label: tensor.clone() for label, tensor in state.items()}
        expected, expected_state = self._run(before, state, initial)
        actual, actual_state = self._run(after, state, initial)
        if len(expected) != len(actual):
            raise PassVerificationError(f"pass {name!r} changed the number of outputs from "
                                        f"{len(expected)} to {len(actual)}")
        for position, (ref, out) in enumerate(zip(expected, actual)):
            problem = _difference(ref, out)
            if problem is not None:
                raise PassVerificationError(f"pass {name!r} changed the result: output {position} "
                                            f"{problem}")
        for label in state:
            problem = _difference(expected_state[label], actual_state[label])
            if problem is not None:
                raise PassVerificationError(f"pass {name!r} changed what the graph writes: "
                                            f"{label} {problem}")
        logger.debug("pass %s verified on %d outputs and %d written tensors", name, len(expected),
                     len(state))

    def _run(self, gm: fx.GraphModule, state: dict[str, torch.Tensor],
             initial: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """`gm`'s flat outputs and the written tensors after it ran; then the state as it was."""
        assert self.verify_inputs is not None
        context = self.verify_context if self.verify_context is not None else nullcontext
        try:
            with torch.no_grad(), context():
                outputs = tree_flatten(gm(*self.verify_inputs))[0]
            return outputs, {label: tensor.clone() for label, tensor in state.items()}
        finally:
            with torch.no_grad():
                for label, tensor in state.items():
                    tensor.copy_(initial[label])


def written_state(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The tensors `gm` may write into, by label ("attribute 'state'", "input 0 (x)").

    Each written argument is followed back through first arguments (a view's source) to the
    attribute or input it comes from; that over-approximates what a write may reach.
    """
    placeholders = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    found: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        for written in written_args(node):
            root = written
            while root.op not in ("get_attr", "placeholder") and root.args \
                    and isinstance(root.args[0], fx.Node):
                root = root.args[0]
            if root.op == "get_attr":
                value, label = constant_tensor(gm, root), f"attribute {root.target!r}"
            elif root.op == "placeholder" and placeholders[root] < len(inputs):
                index = placeholders[root]
                value, label = inputs[index], f"input {index} ({root.name})"
            else:
                continue
            if isinstance(value, torch.Tensor):
                found[label] = value
    return found


def _difference(ref: Any, out: Any) -> str | None:
    """How `out` differs from `ref` beyond rounding, or None when they agree."""
    if not isinstance(ref, torch.Tensor):
        return None if ref == out else f"was {ref!r}, became {out!r}"
    if not isinstance(out, torch.Tensor) or ref.shape != out.shape:
        return f"had shape {tuple(ref.shape)}, became {getattr(out, 'shape', type(out).__name__)}"
    if not ref.is_floating_point():
        return None if torch.equal(ref, out) else "(integers) changed"
    diff = (ref.double() - out.double()).abs()
    diff[ref.isnan() & out.isnan()] = 0
    if diff.numel() == 0:
        return None
    allowed = tolerance(ref) * (1 + ref.double().abs())
    if bool(diff.isnan().any()) or bool((diff > allowed).any()):
        return f"differs by up to {float(diff.nan_to_num(float('inf')).max()):.3g} (tolerance {tolerance(ref):.1g})"
    return None


def tolerance(reference: torch.Tensor) -> float:
    """Agreement expected between two orders of the same float arithmetic."""
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
            torch.bfloat16: 3e-2}.get(reference.dtype, 1e-4)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of the graph, sharing the (unchanged) parameters."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph, type(gm).__name__)
