"""`python -m compiler demo`: compile fxkiln's BART and Llama, generate, compare with eager.

Each model is a preset of `models.presets` (a Hugging Face config with seeded random weights;
nothing is downloaded), loaded with `models.from_hf` and compiled by `compile_model` with the
default pipeline and capture sizes. The demo generates the same tokens eagerly and compiled
(greedy, EOS off so that both runs make the same number of tokens), checks they are equal,
and times both: a warm-up run each, then TIMED_RUNS runs each, eager and compiled interleaved
(alternating which goes first), so that both see the same machine; the best run of each is
what it reports. The CLI prints; this module returns values.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compiler.compile import compile_model
from compiler.compiled_model import CompiledModel
from compiler.config import CompileConfig
from runtime import generate

DEFAULT_MODELS = ("bart-tiny", "llama-tiny")
TIMED_RUNS = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed run, eager and compiled, in the order they ran (interleaved)."""

    eager: tuple[float, ...]
    compiled: tuple[float, ...]

    @property
    def eager_best(self) -> float:
        return min(self.eager)

    @property
    def compiled_best(self) -> float:
        return min(self.compiled)

    @property
    def speedup(self) -> float:
        """Eager's best run over compiled's: above 1, compiled is faster."""
        return self.eager_best / self.compiled_best if self.compiled_best > 0 else float("inf")

    @property
    def spread(self) -> float:
        """How far the slowest run of either side is above its best (0.5: 50% slower)."""
        return max(max(runs) / min(runs) - 1 for runs in (self.eager, self.compiled)
                   if min(runs) > 0)


@dataclass(frozen=True)
class DemoRun:
    """One model's demo: what was built, the tokens of both runs and their speed."""

    name: str
    description: str
    compiled: CompiledModel
    eager_tokens: torch.Tensor      # (batch, new_tokens)
    compiled_tokens: torch.Tensor   # (batch, new_tokens)
    timing: Timing

    @property
    def equal(self) -> bool:
        return torch.equal(self.eager_tokens, self.compiled_tokens)

    def tokens_per_second(self, seconds: float) -> float:
        return self.eager_tokens.numel() / seconds if seconds > 0 else float("inf")

    def first_difference(self) -> tuple[int, int] | None:
        """(sequence, step) of the first token where the runs differ, None if equal."""
        differ = (self.eager_tokens != self.compiled_tokens).nonzero()
        if differ.numel() == 0:
            return None
        first = differ[differ[:, 1].argmin()]
        return int(first[0]), int(first[1])


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere; else one of DTYPES."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, found {name!r}")
    return DTYPES[name]


def run_demo(name: str, config: CompileConfig, dtype: torch.dtype, batch: int,
             prompt_len: int, new_tokens: int, seed: int = 0) -> DemoRun:
    """Build preset `name`, compile it with `config`, generate eagerly and compiled, time both.

    The prompt is `batch` sequences of `prompt_len` seeded random ids: the decoder prompt of a
    decoder-only model, the encoder input of an encoder-decoder one (whose decoder starts
    from its decoder_start_token_id).
    """
    from models import from_hf  # the demo builds project models; the compiler does not need them
    from models.presets import hf_model

    device = config.resolved_device()
    hf = hf_model(name, device=device, dtype=dtype, seed=seed)
    model = from_hf(hf)
    del hf
    parameters = sum(p.numel() for p in model.parameters())
    description = (f"{type(model).__name__}, {parameters:,} parameters, "
                   f"{str(dtype).removeprefix('torch.')} on {device}")
    compiled = compile_model(model, config=config)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=generator)
    ids = ids.to(device)
    prompt, source = (None, ids) if model.is_encoder_decoder else (ids, None)

    def run(target: Any) -> torch.Tensor:
        return generate(target, prompt, new_tokens, encoder_input_ids=source, ignore_eos=True)

    eager_tokens, compiled_tokens, timing = timed_interleaved(run, model, compiled, device)
    return DemoRun(name, description, compiled, eager_tokens, compiled_tokens, timing)


def timed_interleaved(run: Callable[[Any], torch.Tensor], eager: Any, compiled: Any,
                       device: torch.device, repeats: int = TIMED_RUNS
                       ) -> tuple[torch.Tensor, torch.Tensor, Timing]:
    """Tokens of both, and the seconds of `repeats` runs of each after one warm-up run each.

    Runs alternate, and so does which of the two goes first in each round, so that neither
    gets a quieter or warmer machine; synchronized on CUDA.
    """
    tokens = {"eager": run(eager), "compiled": run(compiled)}
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    targets = {"eager": eager, "compiled": compiled}
    for round_index in range(repeats):
        order = ("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager")
        for side in order:
            _synchronize(device)
            start = time.perf_counter()
            tokens[side] = run(targets[side])
            _synchronize(device)
            seconds[side].append(time.perf_counter() - start)
    return tokens["eager"], tokens["compiled"], Timing(tuple(seconds["eager"]),
                                                       tuple(seconds["compiled"]))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
