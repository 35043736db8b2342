"""One rank of benchmarks/tensor_parallel.py: its shard, compiled, generating and timed.

Every rank builds the same seeded Hugging Face preset, checks that the other rank built the same
weights, and loads its shard with `from_hf(hf, tp_size=world_size)`. Rank 0 also loads the whole
model (TP=1) from the same weights and measures it first, while the other ranks wait on a CPU
(gloo) barrier; then all ranks compile and run their shards in lockstep (compile, warm-up and
graph capture included: the collectives inside the pieces need every rank).

Results go to the parent as they are made, one message per measurement, on a queue:
("stage", rank, text), ("data", rank, (kind, key, value)), then ("done", rank, None) or
("error", rank, traceback). Partial results survive a rank that hangs or dies later.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parent), str(BENCHMARKS)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from compiler import CompileConfig, compile_model  # noqa: E402
from models import from_hf  # noqa: E402
from models.presets import hf_model  # noqa: E402
from piecewise_decode import step_ms  # noqa: E402  (the same decode-step timing)
from runtime import generate  # noqa: E402

# NVLink multicast (NVLS) can take a shared machine down: every process keeps it off.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
VARIANTS = ("passes", "passes+graphs")


@dataclass(frozen=True)
class Plan:
    """What every rank of one phase runs."""

    device_type: str                 # "cuda" | "cpu"
    preset: str                      # a models.presets name
    batches: tuple[int, ...]
    variants: tuple[str, ...]        # names from VARIANTS
    prompt_len: int
    new_tokens: int
    timing_dtype: str                # step times are measured in this dtype only
    token_dtypes: tuple[str, ...]    # greedy tokens are compared in each of these
    timeout_s: float
    port: int
    seed: int = 0


def key(*parts: object) -> str:
    """One measurement's name: variant|tp|dtype[|batch]."""
    return "|".join(str(part) for part in parts)


def compile_config(variant: str, device: torch.device, batches: tuple[int, ...]) -> CompileConfig:
    if variant == "passes":
        return CompileConfig(device=str(device), capture_sizes=())
    if variant == "passes+graphs":  # on CPU: the replay simulator (same buffer semantics)
        sizes = tuple(sorted({1, 2, 4, 8, *batches}))
        return CompileConfig(device=str(device), capture_sizes=sizes,
                             simulate_capture=device.type == "cpu")
    raise ValueError(f"variant: expected one of {VARIANTS}, found {variant!r}")


class Reporter:
    """Sends this rank's progress and measurements to the parent."""

    def __init__(self, rank: int, messages: Any) -> None:
        self.rank, self.messages = rank, messages

    def stage(self, text: str) -> None:
        self.messages.put(("stage", self.rank, text))

    def data(self, kind: str, name: str, value: Any) -> None:
        self.messages.put(("data", self.rank, (kind, name, value)))


def rank_main(rank: int, world_size: int, plan: Plan, messages: Any) -> None:
    """Entry point of a spawned rank; never raises (errors go to the parent)."""
    reporter = Reporter(rank, messages)
    try:
        Rank(rank, world_size, plan, reporter).run()
        messages.put(("done", rank, None))  # before the teardown, which the parent may cut short
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (report anything, then leave without cleanup)
        messages.put(("error", rank, traceback.format_exc()))
        messages.close()
        messages.join_thread()
        os._exit(1)  # a process group mid-collective could hang a clean exit


class Rank:
    """The work of one rank; see the module docstring."""

    def __init__(self, rank: int, world_size: int, plan: Plan, reporter: Reporter) -> None:
        self.rank, self.world_size, self.plan, self.reporter = rank, world_size, plan, reporter
        self.device = torch.device(plan.device_type, rank if plan.device_type == "cuda" else None)
        self.failed_tp2: dict[str, str] = {}  # variant -> why its TP=2 compile failed
        self.control: dist.ProcessGroup | None = None  # gloo: barriers and small objects

    def run(self) -> None:
        self._init_distributed()
        for dtype_name in self.plan.token_dtypes:
            tp2, tp1 = self._build(getattr(torch, dtype_name))
            timed = dtype_name == self.plan.timing_dtype
            for variant in self.plan.variants:
                self._run_variant(tp2, tp1, variant, dtype_name, timed)
            del tp2, tp1
            self._free()
        dist.barrier(group=self.control)

    def _run_variant(self, tp2: torch.nn.Module, tp1: torch.nn.Module | None, variant: str,
                     dtype_name: str, timed: bool) -> None:
        if tp1 is not None:
            self._measure(compile_model(tp1, config=self._config(variant)), tp1, 1, variant,
                          dtype_name, timed)
        dist.barrier(group=self.control)  # the other ranks wait for TP=1 here
        if variant in self.failed_tp2:
            return  # no second try in the next dtype: a failed capture may leave NCCL stuck
        compiled = self._compile_everywhere(tp2, variant)
        if compiled is not None:
            self._measure(compiled, tp2, self.world_size, variant, dtype_name, timed)

    def _init_distributed(self) -> None:
        for name, value in SAFE_ENV.items():
            if os.environ.get(name) != value:
                raise RuntimeError(f"{name}: expected {value!r} in every rank's environment "
                                   f"(NVLink multicast off), found {os.environ.get(name)!r}")
        timeout = timedelta(seconds=self.plan.timeout_s)
        init = f"tcp://127.0.0.1:{self.plan.port}"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 tokens: full fp32 GEMMs
            torch.backends.cudnn.allow_tf32 = False
            dist.init_process_group("nccl", init_method=init, rank=self.rank, timeout=timeout,
                                    world_size=self.world_size, device_id=self.device)
            self.control = dist.new_group(backend="gloo", timeout=timeout)
        else:
            torch.set_num_threads(1)  # tiny shapes: intra-op threads only contend
            dist.init_process_group("gloo", init_method=init, rank=self.rank, timeout=timeout,
                                    world_size=self.world_size)
            self.control = dist.group.WORLD
        self.reporter.stage(f"joined the {dist.get_backend()} group on {self.device}")
        if self.device.type == "cuda":
            self.reporter.data("info", "device", torch.cuda.get_device_name(self.device))
            version = torch.cuda.nccl.version()
            self.reporter.data("info", "nccl", ".".join(map(str, version))
                               if isinstance(version, tuple) else str(version))

    def _build(self, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """This rank's shard and, on rank 0, the whole model, from one seeded HF model."""
        hf = hf_model(self.plan.preset, self.device, dtype, seed=self.plan.seed)
        with torch.no_grad():
            fingerprint = sum(float(p.double().sum()) for p in hf.parameters())
        fingerprints: list[Any] = [None] * self.world_size
        dist.all_gather_object(fingerprints, fingerprint, group=self.control)
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"expected every rank to build the same seeded weights, found "
                               f"parameter sums {fingerprints} (rank order)")
        tp2 = from_hf(hf, tp_size=self.world_size)
        tp1 = from_hf(hf) if self.rank == 0 else None
        del hf
        self._free()
        self.reporter.stage(f"built {self.plan.preset} in {dtype}")
        return tp2, tp1

    def _compile_everywhere(self, model: torch.nn.Module, variant: str) -> Any:
        """The shard compiled (in lockstep on every rank); None, recorded, if any rank failed."""
        compiled, error = None, None
        self.reporter.stage(f"compiling TP={self.world_size} {variant} (in lockstep)")
        try:
            compiled = compile_model(model, config=self._config(variant))
        except Exception as exc:  # noqa: BLE001  (recorded: graphs may not capture collectives)
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            self.reporter.stage(f"TP={self.world_size} {variant} failed to compile: {error}")
        errors: list[Any] = [None] * self.world_size
        dist.all_gather_object(errors, error, group=self.control)
        failures = [e for e in errors if e is not None]
        if failures:
            self.failed_tp2[variant] = "; ".join(failures)
            self.reporter.data("failure", key(variant, self.world_size), self.failed_tp2[variant])
            return None
        return compiled

    def _config(self, variant: str) -> CompileConfig:
        return compile_config(variant, self.device, self.plan.batches)

    def _measure(self, compiled: Any, model: torch.nn.Module, tp: int, variant: str,
                 dtype_name: str, timed: bool) -> None:
        """Greedy tokens at every batch and, if `timed`, decode-step times of `compiled`."""
        report = compiled.report
        self.reporter.data("compile", key(variant, tp, dtype_name), {
            "compile_s": report.compile_seconds, "capture_s": report.capture_seconds,
            "graph_memory_bytes": report.graph_memory_bytes, "pieces": report.pieces,
            "captured_sizes": list(report.captured_sizes),
            "collectives_in_graphs": collectives_in_graphs(compiled)})
        for batch in self.plan.batches:
            tokens = generate(compiled, self._prompt(model, batch), self.plan.new_tokens,
                              ignore_eos=True)
            self.reporter.data("tokens", key(variant, tp, dtype_name, batch), tokens.tolist())
            if timed:
                torch.manual_seed(self.plan.seed + batch)  # the same prompt on every rank
                self.reporter.data("step_ms", key(variant, tp, dtype_name, batch),
                                   step_ms(compiled, model, batch, self.device))
        self.reporter.stage(f"measured TP={tp} {variant} in {dtype_name}")

    def _prompt(self, model: torch.nn.Module, batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.plan.seed + batch)
        vocab = model.config.vocab_size
        prompt = torch.randint(3, vocab, (batch, self.plan.prompt_len), generator=generator)
        return prompt.to(self.device)  # (batch, prompt_len), the same on every rank

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def collectives_in_graphs(compiled: Any) -> int | None:
    """Collective calls inside the pieces that were captured as graphs (None: no runner)."""
    pieces = getattr(getattr(compiled, "_run", None), "piece_runners", None)
    if pieces is None:
        return None
    return sum(1 for piece in pieces if piece.entries
               for node in piece.graph_module.graph.nodes
               if "_c10d_functional" in str(node.target) and "wait_tensor" not in str(node.target))


def ensure_safe_environment() -> dict[str, str]:
    """Put SAFE_ENV into os.environ, which the processes started afterwards inherit; returns
    the values it overrode (it never turns a setting back on)."""
    overridden = {name: os.environ[name] for name, value in SAFE_ENV.items()
                  if name in os.environ and os.environ[name] != value}
    os.environ.update(SAFE_ENV)
    return overridden
