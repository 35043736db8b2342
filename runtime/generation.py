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

Tokens stay on the device, and no step waits for the device to finish it: which rows emitted
EOS is copied to host memory without blocking and read one step late, after the next step is
queued (`EosFlags`), so the host prepares step k + 1 while the device runs step k. A sequence
that emitted EOS at step k therefore runs step k + 1 too; that token is discarded (its KV write
is harmless: the sequence never runs again). With no EOS (`ignore_eos`) nothing is read back
at all until the end.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from runtime.forward_context import device_ints
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


class EosFlags:
    """Which rows of a step emitted an EOS id, read back one step late without a sync of its own:
    `publish` queues the test and a non-blocking copy to host memory (pinned on CUDA) behind
    the step; `take`, called once the next step is queued, waits for that copy only."""

    def __init__(self, eos: torch.Tensor, batch: int) -> None:
        self.eos = eos
        cuda = eos.device.type == "cuda"
        self._buffer = torch.zeros(batch, dtype=torch.bool, pin_memory=cuda)
        self._views: dict[int, torch.Tensor] = {}  # the buffer's first n rows, by n
        self._event = torch.cuda.Event() if cuda else None
        self._rows: list[int] = []

    def publish(self, rows: list[int], tokens: torch.Tensor) -> None:
        """tokens (len(rows),): the tokens the sequences `rows` emitted this step."""
        emitted_eos = torch.eq(tokens.unsqueeze(1), self.eos).any(1)  # isin may sort: a sync
        self._host(len(rows)).copy_(emitted_eos, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._rows = rows

    def take(self) -> set[int]:
        """The rows of the step published last that emitted EOS (none if nothing is pending)."""
        rows, self._rows = self._rows, []
        if not rows:
            return set()
        if self._event is not None:
            self._event.synchronize()
        flags = self._host(len(rows)).tolist()
        return {row for row, done in zip(rows, flags) if done}

    def _host(self, rows: int) -> torch.Tensor:
        view = self._views.get(rows)
        if view is None:
            view = self._views[rows] = self._buffer[:rows]
        return view


class _GenerationLoop:
    """The steps of one `generate` call: prefill chunks (all prompts at once by default) and
    decode steps; tokens chosen and recorded after each, and sequences dropped once they are
    known to be finished (EOS one step late: see the module docstring)."""

    def __init__(self, session: DecodeSession, prompts: Sequence[torch.Tensor],
                 encoder_inputs: Sequence[torch.Tensor] | None, planner: PrefillPlanner,
                 choose: TokenChooser, max_new_tokens: int, eos: torch.Tensor | None,
                 pad_id: int) -> None:
        self.session, self.prompts, self.encoder_inputs = session, prompts, encoder_inputs
        self.planner, self.choose = planner, choose
        self.eos = None if eos is None else EosFlags(eos, session.batch)
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
            finished = self.eos.take() if self.eos is not None else set()  # the step before
            self._emit(emitted, rows, logits, finished)

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
            new_rows = device_ints(completing, self.session.device, torch.long)
            return torch.cat([self.decoding_rows, new_rows]), logits
        return self.decoding_rows, logits

    def _emit(self, emitted: list[int], rows: torch.Tensor, logits: torch.Tensor,
              finished: set[int]) -> None:
        """Choose the tokens of the sequences `emitted` (device `rows`), record those of the
        ones not `finished` (at the step before: this step's token is discarded), and keep
        those that go on decoding."""
        if not emitted:
            return
        steps = [self.counts[r] for r in emitted]
        lockstep = len(set(steps)) == 1
        tokens = self.choose(logits, rows, steps[0] if lockstep else steps)  # (emitted,)
        if finished:
            kept = [i for i, row in enumerate(emitted) if row not in finished]
            index = device_ints(kept, rows.device, torch.long)
            emitted, rows, tokens = [emitted[i] for i in kept], rows[index], tokens[index]
            steps = [steps[i] for i in kept]
        if emitted:
            columns = steps[0] if lockstep else device_ints(steps, rows.device, torch.long)
            self.generated[rows, columns] = tokens
            if self.eos is not None:
                self.eos.publish(emitted, tokens)
        for row in emitted:
            self.counts[row] += 1
        keep = [i for i, row in enumerate(emitted) if self.counts[row] < self.max_new_tokens]
        if len(keep) == len(emitted):
            self.decoding, self.decoding_rows, self.newest = emitted, rows, tokens
        else:
            index = device_ints(keep, rows.device, torch.long)
            self.decoding = [emitted[i] for i in keep]
            self.decoding_rows, self.newest = rows[index], tokens[index]
        pending = self.planner.pending
        self.choose.release(0 if pending or not self.decoding
                            else min(self.counts[r] for r in self.decoding))
