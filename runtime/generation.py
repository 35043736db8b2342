"""Generation on a project model, eager or compiled: greedy or seeded sampling, stopping at EOS.

`generate` drives a `DecodeSession` (`runtime.session`: the step-level API, for callers that
choose tokens themselves) over prompts of any length. The first step runs every prompt at
once, all sequences' tokens flattened into one forward (with `prefill_chunk_tokens`, prompts
are fed in chunks over several steps, mixed with the decode steps of sequences whose prompt is
done); it computes the logits of each prompt's last token only. Then each step feeds every
running sequence its newest token.

Sequences that finish (emit an end-of-sequence token, or reach max_new_tokens) leave the
running batch: later steps carry only the running sequences, whose KV slots stay where they
are, so a compiled model replays a smaller bucket.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from runtime.prompts import PromptsInput, prepare_request, stop_tokens
from runtime.sampling import SamplingParams, TokenChooser
from runtime.scheduler import Chunk, PrefillPlanner
from runtime.session import DecodeSession, GenerationModel, find_generation_model
from runtime.step_metadata import step_metadata, uniform_batch_metadata

__all__ = ["DecodeSession", "GenerationModel", "find_generation_model", "generate",
           "step_metadata", "uniform_batch_metadata"]


@torch.no_grad()
def generate(model: Callable[..., torch.Tensor], input_ids: PromptsInput | None,
             max_new_tokens: int, encoder_input_ids: PromptsInput | None = None, *,
             attention_mask: torch.Tensor | None = None,
             encoder_attention_mask: torch.Tensor | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             ignore_eos: bool = False, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             prefill_chunk_tokens: int | None = None,
             input_features: torch.Tensor | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens per sequence; returns them, `(batch, steps_run)`.

    input_ids: the prompts: a (batch, length) tensor, the same padded (left or right) with
        `attention_mask` (1 = token, 0 = padding), or a list of 1-D prompts of any length.
        Each sequence gets the tokens it would get alone. For encoder-decoder models it is the
        decoder prompt; None means one `decoder_start_token_id` per sequence.
    encoder_input_ids: required by encoder-decoder models only, in the same forms (with
        `encoder_attention_mask`); the encoder runs once per sequence, in its first step.
    eos_token_id: an id or ids that end a sequence; None takes the model config's (as Hugging
        Face does). A sequence that emits one is finished: it leaves the running batch and its
        later positions hold `pad_token_id` (None: the config's; with neither, the first EOS
        id, warned once, as Hugging Face does). Generation stops when every sequence is
        finished or has max_new_tokens tokens. Hugging Face's forced BOS/EOS tokens
        (`forced_eos_token_id`) are not applied.
    ignore_eos: True generates exactly max_new_tokens tokens for every sequence.
    do_sample, temperature, top_k, top_p, seed: greedy (default) or sampling; see
        `runtime.sampling`. The same seed gives the same tokens, eager or compiled, chunked or
        not, and whatever other sequences of the batch do.
    prefill_chunk_tokens: at most this many prompt tokens per step (chunked prefill; None: all
        prompts in the first step). The tokens do not change.
    input_features: the encoder input of models whose encoder reads features instead of
        token ids (Whisper: (batch, mel bins, frames)); in place of encoder_input_ids.
    Ids outside the vocabulary and prompts too long for the model's positions (with
    max_new_tokens) are refused before any step runs.
    """
    spec_model = find_generation_model(model)
    request = prepare_request(spec_model, input_ids, attention_mask, encoder_input_ids,
                              encoder_attention_mask, max_new_tokens, input_features)
    chooser_params = SamplingParams(do_sample, temperature, top_k, top_p, seed)
    planner = PrefillPlanner(request.prompt_lens, prefill_chunk_tokens)
    eos_ids, pad_id = stop_tokens(getattr(spec_model, "config", None), eos_token_id,
                                  pad_token_id, ignore_eos)
    batch, device = len(request.prompts), request.device
    if max_new_tokens == 0:
        return torch.empty((batch, 0), dtype=torch.long, device=device)
    session = DecodeSession(model, batch, request.prompt_lens, max_new_tokens,
                            request.encoder_lens, device)
    loop = _GenerationLoop(session, request.prompts, request.encoder_inputs, planner,
                           TokenChooser(chooser_params, batch, device), max_new_tokens,
                           None if eos_ids is None else torch.tensor(eos_ids, device=device),
                           pad_id)
    return loop.run()


class _GenerationLoop:
    """The steps of one `generate` call: prefill chunks (all prompts at once by default) and
    decode steps; tokens chosen, EOS checked and finished sequences dropped after each."""

    def __init__(self, session: DecodeSession, prompts: Sequence[torch.Tensor],
                 encoder_inputs: Sequence[torch.Tensor] | None, planner: PrefillPlanner,
                 choose: TokenChooser, max_new_tokens: int, eos: torch.Tensor | None,
                 pad_id: int) -> None:
        self.session, self.prompts, self.encoder_inputs = session, prompts, encoder_inputs
        self.planner, self.choose, self.eos = planner, choose, eos
        self.max_new_tokens = max_new_tokens
        device = session.device
        self.generated = torch.full((session.batch, max_new_tokens), pad_id, dtype=torch.long,
                                    device=device)
        self.counts = [0] * session.batch           # tokens generated per sequence
        self.decoding: list[int] = []               # sequences fed their newest token next
        self.decoding_rows = torch.empty(0, dtype=torch.long, device=device)
        self.newest = torch.empty(0, dtype=torch.long, device=device)  # their newest tokens

    def run(self) -> torch.Tensor:
        while True:
            chunks = self.planner.next_chunks()
            if not chunks and not self.decoding:
                return self.generated[:, :max(self.counts)]
            if chunks:
                rows, logits = self._mixed_step(chunks)
            else:
                rows, logits = self.decoding_rows, self.session.decode(self.newest, self.decoding)
            emitted = self.decoding + [c.row for c in chunks if c.completes]
            self._emit(emitted, rows, logits)

    def _mixed_step(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """A step with prompt chunks (after the decoding sequences' newest tokens); returns the
        rows that emit a token, as a device tensor, and their logits."""
        rows = self.decoding + [c.row for c in chunks]
        tokens = torch.cat([self.newest] + [self.prompts[c.row][c.start:c.start + c.count]
                                            for c in chunks])
        encoder = None if self.encoder_inputs is None else {
            c.row: self.encoder_inputs[c.row] for c in chunks if c.start == 0}
        completing = [c.row for c in chunks if c.completes]
        read = list(range(len(self.decoding))) + [len(self.decoding) + i
                                                  for i, c in enumerate(chunks) if c.completes]
        logits = self.session.step(rows, tokens, encoder,
                                   counts=[1] * len(self.decoding) + [c.count for c in chunks],
                                   read=read)
        if completing:
            new_rows = torch.tensor(completing, dtype=torch.long, device=self.session.device)
            return torch.cat([self.decoding_rows, new_rows]), logits
        return self.decoding_rows, logits

    def _emit(self, emitted: list[int], rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Choose the tokens of the sequences `emitted` (device `rows`), record them, and keep
        those that go on decoding."""
        if not emitted:
            return
        steps = [self.counts[r] for r in emitted]
        lockstep = len(set(steps)) == 1
        tokens = self.choose(logits, rows, steps[0] if lockstep else steps)  # (emitted,)
        columns = steps[0] if lockstep else torch.tensor(steps, device=rows.device)
        self.generated[rows, columns] = tokens
        for row in emitted:
            self.counts[row] += 1
        finished = [False] * len(emitted) if self.eos is None else \
            torch.isin(tokens, self.eos).tolist()                  # syncs the host
        keep = [i for i, (row, done) in enumerate(zip(emitted, finished))
                if not done and self.counts[row] < self.max_new_tokens]
        if len(keep) == len(emitted):
            self.decoding, self.decoding_rows, self.newest = emitted, rows, tokens
        else:
            kept = torch.tensor(keep, dtype=torch.long, device=rows.device)
            self.decoding = [emitted[i] for i in keep]
            self.decoding_rows, self.newest = rows[kept], tokens[kept]
        pending = self.planner.pending
        self.choose.release(0 if pending or not self.decoding
                            else min(self.counts[r] for r in self.decoding))
