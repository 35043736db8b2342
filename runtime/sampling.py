"""Choosing each step's next tokens from logits: greedy, or seeded sampling.

Sampling follows Hugging Face's order: divide the logits by `temperature`, keep the `top_k`
highest, then keep the smallest set of highest-probability tokens whose probability reaches
`top_p`; the rest get probability 0. The draw itself is an exponential race (the Gumbel-max
trick): token = argmax(probs / E) with E ~ Exponential(1) drawn for every sequence of the batch
at every step, finished or not. So a sequence's tokens depend only on its own logits and the
seed, never on which other sequences are still running (compaction changes no result), and
the draw needs no host synchronization.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import runtime.kernels  # noqa: F401  (registers the argmax implementations)
from runtime import registry


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; names and meanings as in Hugging Face's GenerationConfig.

    do_sample: False = greedy (argmax of the logits; the other fields are checked, not used).
    temperature: > 0; logits are divided by it before filtering.
    top_k: keep the k highest logits (None: all).
    top_p: keep the smallest set of tokens whose probability sum reaches top_p, in (0, 1]
        (None or 1: all).
    seed: seeds the sampling generator; None draws a fresh seed.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample: expected a bool, found {self.do_sample!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature: expected a finite number > 0, found {temperature!r} "
                             f"(for greedy decoding pass do_sample=False)")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: expected an int >= 1 or None, found {self.top_k!r}")
        if self.top_p is not None and (isinstance(self.top_p, bool)
                                       or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1] or None, found {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise ValueError(f"seed: expected an int or None, found {self.seed!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (rows, vocab) with every token outside the top-k and top-p sets set to -inf.

    Ties at the k-th value are all kept (as Hugging Face does). The top-p set of a row is the
    shortest run of its tokens in descending order whose probabilities sum to >= top_p; the
    most likely token is always kept.
    """
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]       # (rows, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)   # (rows, vocab) each
        probs = ordered.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                     # of higher-ranked tokens
        drop_ordered = mass_before >= top_p
        drop_ordered[..., 0] = False
        drop = torch.zeros_like(drop_ordered).scatter(-1, order, drop_ordered)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (rows, vocab) -> the float32 distribution tokens are drawn from (rows, vocab)."""
    scaled = logits.float() / params.temperature
    return filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)


class TokenChooser:
    """Picks the next token of each running sequence of a batch of `batch` sequences.

    Sampling draws from a `torch.Generator` on `device` seeded with `params.seed`: draw k is
    (batch, vocab) exponentials, one row per sequence, and a sequence's k-th token uses row b
    of draw k, whichever step it comes in (with chunked prefill, sequences reach their k-th
    token at different steps). Draws are made in order of k and kept until `release`.
    """

    def __init__(self, params: SamplingParams, batch: int, device: torch.device,
                 argmax: str = registry.AUTO) -> None:
        self.params, self.batch, self.argmax = params, batch, argmax
        self.generator: torch.Generator | None = None
        self._draws: dict[int, torch.Tensor] = {}
        self._next_draw = 0
        self._argmax: dict[tuple[torch.device, torch.dtype], registry.KernelImpl] = {}
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | None = None,
                 token_index: int | Sequence[int] | None = None) -> torch.Tensor:
        """logits (running, vocab) of the sequences `rows` (None: all) -> tokens (running,).

        token_index: which token of its sequence each row picks (one int: all the same);
        None: the next draw, as when every sequence steps in lockstep.
        """
        if self.generator is None:
            return self._first_max(logits)
        probs = sampling_probs(logits, self.params)                    # (running, vocab)
        noise = self._noise(probs, rows, token_index)                  # (running, vocab)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)                # 0 would make p / 0 = inf
        return self._first_max(probs / noise)

    def _first_max(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (running, vocab) -> each row's argmax, through the implementation of the
        `argmax` kernel named `self.argmax`, chosen once per device and dtype ("auto": Triton's
        two-stage kernel on CUDA, `torch.argmax` on CPU); no setting is read per step."""
        key = (scores.device, scores.dtype)
        impl = self._argmax.get(key)
        if impl is None:
            impl = self._argmax[key] = registry.choose_kernel("argmax", self.argmax,
                                                              scores.device, scores.dtype)
        return impl.fn(*impl.call_args((scores,)))

    def release(self, before: int) -> None:
        """Forget the draws of token indices below `before` (no sequence needs them again)."""
        for index in [k for k in self._draws if k < before]:
            del self._draws[index]

    def _noise(self, probs: torch.Tensor, rows: torch.Tensor | None,
               token_index: int | Sequence[int] | None) -> torch.Tensor:
        """(running, vocab) exponentials: row b of draw token_index[i] for each row i."""
        if token_index is None:  # lockstep: the next draw, not kept
            noise = self._noise(probs, rows, self._next_draw)
            self.release(self._next_draw)
            return noise
        indices = [token_index] if isinstance(token_index, int) else list(token_index)
        for index in range(self._next_draw, max(indices) + 1):
            assert self.generator is not None
            self._draws[index] = torch.empty((self.batch, probs.shape[-1]), dtype=torch.float32,
                                             device=probs.device).exponential_(
                                                 generator=self.generator)
        self._next_draw = max(self._next_draw, max(indices) + 1)
        all_rows = torch.arange(self.batch, device=probs.device) if rows is None else rows
        if len(set(indices)) == 1:
            draw = self._draws[indices[0]]
            return draw.clone() if rows is None else draw[rows]
        distinct = sorted(set(indices))
        which = torch.tensor([distinct.index(k) for k in indices], device=probs.device)
        return torch.stack([self._draws[k] for k in distinct])[which, all_rows]
