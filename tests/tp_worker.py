"""Tensor-parallel worker processes for the TP tests: a persistent 2-rank gloo group on CPU.

The test process starts the ranks once (`TPPool`), sends each the same `TPTask`, and gets back
every rank's result. Each rank builds the same seeded Hugging Face model, loads its own shard
with `from_hf(hf, tp_size=world_size)` and runs the task.
"""
from __future__ import annotations

import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import generate
from tests.model_oracle import build_hf, step_logits

TIMEOUT_S = 120
SIMULATED_GRAPHS = CompileConfig(device="cpu", capture_sizes=(1, 2, 4), simulate_capture=True,
                                 debug=True, prefill_capture_sizes=())


@dataclass(frozen=True)
class TPTask:
    kind: str                                   # "llama" | "bart"
    seed: int
    prompt: torch.Tensor                        # (batch, prompt_len)
    continuation: torch.Tensor                  # (batch, steps): logits mode feeds these;
    encoder_ids: torch.Tensor | None = None     # generate mode makes this many new tokens
    overrides: dict[str, Any] = field(default_factory=dict)
    mode: str = "logits"                        # "logits" | "generate" | "compiled-generate"


def run_task(task: TPTask, tp_size: int) -> torch.Tensor:
    """The task's output on this process, with the model sharded over `tp_size` ranks."""
    model = from_hf(build_hf(task.kind, task.seed, **task.overrides), tp_size=tp_size)
    if task.mode in ("generate", "compiled-generate"):
        if task.mode == "compiled-generate":  # passes + simulated graphs, collectives in pieces
            model = _compiled_with_graphs(model)
        prompt = None if task.kind == "bart" else task.prompt
        return generate(model, prompt, task.continuation.shape[1], task.encoder_ids,
                        ignore_eos=True)
    return step_logits(model, task.prompt, task.continuation, task.encoder_ids)


def _compiled_with_graphs(model: torch.nn.Module) -> Any:
    compiled = compile_model(model, config=SIMULATED_GRAPHS)
    report = compiled.report
    if report.captured_sizes != SIMULATED_GRAPHS.capture_sizes or report.pieces < 2:
        raise RuntimeError(f"expected pieces captured for {SIMULATED_GRAPHS.capture_sizes}, "
                           f"found {report.pieces} pieces captured for {report.captured_sizes}")
    return compiled


def serve(rank: int, world_size: int, port: int, tasks: list[Any], results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        while (task := tasks[rank].get()) is not None:
            try:
                results.put((rank, "ok", run_task(task, world_size)))
            except Exception:  # report it to the test process, keep serving
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class TPPool:
    """`world_size` spawned ranks in one gloo group, serving tasks until closed."""

    def __init__(self, world_size: int = 2) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        self.processes = mp.spawn(serve, args=(world_size, _free_port(), self.tasks, self.results),
                                  nprocs=world_size, join=False)

    def run(self, task: TPTask) -> torch.Tensor:
        """Every rank's output must be the same full tensor; returns it."""
        for queue in self.tasks:
            queue.put(task)
        outputs: dict[int, torch.Tensor] = {}
        for _ in range(self.world_size):
            rank, status, payload = self.results.get(timeout=TIMEOUT_S)
            if status != "ok":
                raise RuntimeError(f"TP rank {rank} failed:\n{payload}")
            outputs[rank] = payload
        for rank in range(1, self.world_size):
            torch.testing.assert_close(outputs[rank], outputs[0], atol=0, rtol=0)
        return outputs[0]

    def close(self) -> None:
        for queue in self.tasks:
            queue.put(None)
        self.processes.join(timeout=TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
