"""Prompts of any length in one batch: each sequence gets the tokens Hugging Face gives it alone
(lists, left- or right-padded tensors with attention masks; Llama and BART; eager and compiled
with the replay simulator), chunked prefill changes no token, and the prefill step computes
the logits of each prompt's last token only."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import CompileConfig, compile_model
from models import ProjectModel, from_hf
from runtime import generate
from runtime.forward_context import get_forward_context, set_forward_context
from runtime.generation import DecodeSession
from runtime.runner import BucketRunner
from runtime.step import StepMode
from runtime.whole_step import WholeStepGraphs
from tests.generation_helpers import RecordingModel, finish_at_eos, staggered_eos
from tests.model_oracle import build_hf, decoder_prompt, hf_generate_eos, random_ids

STEPS = 6
LENGTHS = (5, 1, 9, 3)
SIMULATED = CompileConfig(device="cpu", capture_sizes=(1, 2, 4, 8), simulate_capture=True,
                          debug=True, prefill_capture_sizes=(12, 16, 24))  # prefill graphs too


@pytest.fixture(scope="module")
def llama() -> tuple[Any, ProjectModel, Any]:
    hf = build_hf("llama", seed=31)
    model = from_hf(hf)
    return hf, model, compile_model(model, config=SIMULATED)


@pytest.fixture(scope="module")
def bart() -> tuple[Any, ProjectModel, Any]:
    hf = build_hf("bart", seed=32)
    model = from_hf(hf)
    return hf, model, compile_model(model, config=SIMULATED)


def ragged(lengths: tuple[int, ...], vocab: int, seed: int) -> list[torch.Tensor]:
    return [random_ids((n,), vocab, seed=seed + i) for i, n in enumerate(lengths)]


def padded(prompts: list[torch.Tensor], left: bool, pad: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of `prompts` padded to one length, on the left or the right."""
    width = max(p.shape[0] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(width - prompt.shape[0], width) if left else slice(0, prompt.shape[0])
        ids[row, span], mask[row, span] = prompt, 1
    return ids, mask


def alone(hf: Any, kind: str, prompts: list[torch.Tensor], eos: list[int] | None,
          ) -> torch.Tensor:
    """Hugging Face's tokens for each sequence generated alone, padded with 0 to one width."""
    rows = []
    for ids in prompts:
        if kind == "bart":
            rows.append(hf_generate_eos(hf, decoder_prompt(hf, 1).to(ids.device), STEPS, eos, 0,
                                        encoder_ids=ids[None])[0])
        else:
            rows.append(hf_generate_eos(hf, ids[None], STEPS, eos, 0)[0])
    width = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0])]) for r in rows])


def ours(model: Any, kind: str, ids: Any, **options: Any) -> torch.Tensor:
    if kind == "bart":
        mask = options.pop("attention_mask", None)
        return generate(model, None, STEPS, encoder_input_ids=ids, encoder_attention_mask=mask,
                        **options)
    return generate(model, ids, STEPS, **options)


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_each_sequence_gets_hf_alone_tokens_from_lists_and_padded_tensors(
        kind: str, request: pytest.FixtureRequest) -> None:
    hf, model, compiled = request.getfixturevalue(kind)
    prompts = ragged(LENGTHS, hf.config.vocab_size, seed=40)
    free = ours(model, kind, prompts, ignore_eos=True)
    eos = staggered_eos(free)
    expected = alone(hf, kind, prompts, eos)
    assert torch.equal(expected, finish_at_eos(free, eos, 0))  # EOS fires at different steps
    sides = [False] if kind == "bart" else [True, False]  # BART's HF positions assume right pads
    for runner in (model, compiled):
        assert torch.equal(ours(runner, kind, prompts, eos_token_id=eos, pad_token_id=0),
                           expected)
        for left in sides:
            ids, mask = padded(prompts, left, pad=7)
            assert torch.equal(ours(runner, kind, ids, attention_mask=mask, eos_token_id=eos,
                                    pad_token_id=0), expected), (runner, left)


@settings(max_examples=8)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
       chunk=st.one_of(st.none(), st.integers(1, 16)), do_sample=st.booleans(),
       seed=st.integers(0, 2**16))
def test_any_mix_of_lengths_and_chunks_gives_each_sequence_its_tokens_alone(
        llama: tuple, lengths: list[int], chunk: int | None, do_sample: bool, seed: int) -> None:
    """Greedy: each row equals that prompt generated alone. Sampled with a seed: the chunked
    run equals the unchunked one (a sequence's k-th token uses the k-th draw)."""
    hf, model, _ = llama
    prompts = ragged(tuple(lengths), hf.config.vocab_size, seed=seed)
    options = dict(ignore_eos=True, do_sample=do_sample, temperature=2.0, seed=seed)
    batched = generate(model, prompts, STEPS, prefill_chunk_tokens=chunk, **options)
    if do_sample:
        assert torch.equal(batched, generate(model, prompts, STEPS, **options))
        return
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], generate(model, [prompt], STEPS, **options)[0]), row


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_chunked_prefill_mixes_decode_steps_and_changes_no_token(
        kind: str, request: pytest.FixtureRequest) -> None:
    hf, model, compiled = request.getfixturevalue(kind)
    prompts = ragged((2, 11, 3), hf.config.vocab_size, seed=50)
    if kind == "bart":
        decoder = [random_ids((n,), hf.config.vocab_size, seed=60 + n) for n in (4, 1, 6)]
    whole = (generate(model, decoder, STEPS, encoder_input_ids=prompts, ignore_eos=True)
             if kind == "bart" else generate(model, prompts, STEPS, ignore_eos=True))
    for runner in (model, compiled):
        recording = RecordingModel(model, runner)
        if kind == "bart":
            chunked = generate(recording, decoder, STEPS, encoder_input_ids=prompts,
                               ignore_eos=True, prefill_chunk_tokens=4)
        else:
            chunked = generate(recording, prompts, STEPS, ignore_eos=True,
                               prefill_chunk_tokens=4)
        assert torch.equal(chunked, whole)
        tokens = [calls for calls, _ in recording.calls]
        # shortest first: 4 prompt tokens a step, plus one per sequence already decoding
        lengths = (4, 1, 6) if kind == "bart" else (2, 11, 3)
        assert max(tokens) <= 4 + 2 and len(tokens) > STEPS
        assert sum(tokens) == sum(lengths) + 3 * (STEPS - 1)


def full_rows(model: ProjectModel) -> Any:
    """A forward that computes every row's logits (as a model without fxkiln's LM head does)."""
    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        context = get_forward_context()
        every_row = dataclasses.replace(context.attn_metadata, logits_indices=None)
        with set_forward_context(every_row, context.kv_caches):
            return model(*inputs)
    return forward


def test_prefill_computes_only_the_last_row_of_each_prompt(llama: tuple) -> None:
    hf, model, _ = llama
    prompts = ragged(LENGTHS, hf.config.vocab_size, seed=70)
    rows = RecordingOutputs(model)
    tokens = generate(rows, prompts, STEPS, ignore_eos=True)
    assert rows.inputs[0] == sum(LENGTHS) and rows.outputs[0] == len(LENGTHS)
    assert rows.outputs[1:] == rows.inputs[1:] == [len(LENGTHS)] * (STEPS - 1)
    everything = RecordingOutputs(model, full_rows(model))
    assert torch.equal(generate(everything, prompts, STEPS, ignore_eos=True), tokens)
    assert everything.outputs[0] == sum(LENGTHS)  # the session picked the rows itself


class RecordingOutputs(RecordingModel):
    """Records the token rows in and logits rows out of every call."""

    def __init__(self, model: Any, forward: Any = None) -> None:
        super().__init__(model, forward)
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        logits = super().__call__(*inputs)
        self.inputs.append(inputs[0].shape[0])
        self.outputs.append(logits.shape[0])
        return logits


def test_session_steps_read_the_rows_asked_for(llama: tuple) -> None:
    hf, model, _ = llama
    prompts = ragged((3, 6), hf.config.vocab_size, seed=80)
    reference = DecodeSession(model, 2, [3, 6], 4)
    every = reference.step([0, 1], prompts, all_logits=True)             # (9, vocab)
    session = DecodeSession(model, 2, [3, 6], 4)
    first = session.step([1], [prompts[1][:4]], read=[])                  # nothing read
    assert first.shape[0] == 0
    last = session.step([1, 0], [prompts[1][4:], prompts[0]], read=[0, 1])
    torch.testing.assert_close(last, every[[8, 2]], atol=1e-5, rtol=0)
    chunked = DecodeSession(model, 2, [3, 6], 4).prefill_prompts(prompts, chunk_tokens=2)
    torch.testing.assert_close(chunked, every[[2, 8]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sequence 0 brings 5 tokens; expected 1 to 4"):
        session.step([0], [prompts[0][:1].repeat(5)])


def test_bad_requests_are_refused_before_any_step(llama: tuple, bart: tuple) -> None:
    hf, model, _ = llama
    recording = RecordingModel(model)
    limit = hf.config.max_position_embeddings
    vocab = hf.config.vocab_size
    cases = [
        (dict(input_ids=[torch.tensor([3, 4]), torch.tensor([5, vocab + 2])]),
         rf"prompt 1 has token id {vocab + 2} at position 1; expected ids in \[0, {vocab}\)"),
        (dict(input_ids=[torch.tensor([3, -1])]), r"token id -1 at position 1"),
        (dict(input_ids=[torch.ones(3, dtype=torch.long), torch.ones(limit - 3, dtype=torch.long)],
              max_new_tokens=5),
         rf"prompt 1 has {limit - 3} tokens plus max_new_tokens=5, which needs {limit + 1} "
         rf"positions; the model has {limit}"),
        (dict(max_new_tokens=2.0), r"max_new_tokens: expected an int >= 0, found 2.0"),
        (dict(max_new_tokens=True), r"max_new_tokens: expected an int >= 0, found True"),
        (dict(max_new_tokens=-1), r"max_new_tokens: expected an int >= 0, found -1"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long),
              attention_mask=torch.ones(2, 4, dtype=torch.long)),
         r"attention mask of input_ids: expected shape \(2, 3\), found \(2, 4\)"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long),
              attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])),
         r"prompt 1 has no tokens"),
        (dict(input_ids=[torch.ones(3, dtype=torch.long)],
              attention_mask=torch.ones(1, 3, dtype=torch.long)),
         r"an attention mask goes with a padded"),
        (dict(input_ids=torch.ones(3, dtype=torch.long)), r"found a tensor of shape \(3,\)"),
    ]
    for arguments, message in cases:
        arguments = {"input_ids": [torch.tensor([3, 4])], "max_new_tokens": 2, **arguments}
        with pytest.raises(ValueError, match=message):
            generate(recording, arguments.pop("input_ids"), arguments.pop("max_new_tokens"),
                     **arguments)
    assert recording.calls == []
    longest = generate(recording, [torch.ones(limit - 4, dtype=torch.long)], 5, ignore_eos=True)
    assert longest.shape == (1, 5) and len(recording.calls) == 5  # the longest that fits runs
    recording.calls.clear()
    bart_hf, bart_model, _ = bart
    bart_recording = RecordingModel(bart_model)
    with pytest.raises(ValueError, match=r"encoder_input_ids: prompt 0 has 65 tokens, which "
                                         r"needs 65 positions; the model has 64"):
        generate(bart_recording, None, 2, encoder_input_ids=[torch.ones(65, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"input_ids has 2 prompts but the encoder input has 1"):
        generate(bart_recording, [torch.tensor([2]), torch.tensor([2])], 2,
                 encoder_input_ids=[torch.tensor([5, 6])])
    assert recording.calls == [] and bart_recording.calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_ragged_batches_on_cuda_graphs_give_hf_alone_tokens(kind: str) -> None:
    """Float32 on CUDA: the Triton varlen prefill, whole-step decode graphs and EOS compaction;
    chunked or not, every sequence gets Hugging Face's tokens for it alone."""
    hf = build_hf(kind, seed=33).cuda()
    model = from_hf(hf)
    compiled = compile_model(model, config=CompileConfig(device="cuda",
                                                         capture_sizes=(1, 2, 4, 8)))
    assert compiled.report.kernels["attention"] == "triton"
    prompts = [p.cuda() for p in ragged((5, 1, 40, 3, 17), hf.config.vocab_size, seed=90)]
    free = ours(model, kind, prompts, ignore_eos=True)
    eos = staggered_eos(free.cpu())
    expected = alone(hf, kind, prompts, eos).cpu()
    for chunk in (None, 8):
        for runner in (model, compiled):
            tokens = ours(runner, kind, prompts, eos_token_id=eos, pad_token_id=0,
                          prefill_chunk_tokens=chunk)
            assert torch.equal(tokens.cpu(), expected), (runner, chunk)


@pytest.mark.gpu
def test_prefill_steps_replay_cuda_graphs_and_decode_steps_one_graph(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA graphs: a prefill of 59 tokens replays the pieces of prefill bucket 64 (its LM
    head eager, on the 3 rows read), every decode step one whole-step graph; eager's tokens
    (which are HF's: the tests above)."""
    hf = build_hf("llama", seed=34).cuda()
    model = from_hf(hf)
    compiled = compile_model(model, config=CompileConfig(
        device="cuda", capture_sizes=(1, 2, 4), prefill_capture_sizes=(32, 64)))
    steps: list[Any] = []
    dispatch = BucketRunner.dispatch

    def recording(runner: BucketRunner, num_tokens: int, inputs: Any) -> Any:
        steps.append((num_tokens, dispatch(runner, num_tokens, inputs)))
        return steps[-1][1]

    monkeypatch.setattr(BucketRunner, "dispatch", recording)
    fast: list[bool] = []  # decode steps on the fast path: served by a whole-step graph?
    decode = WholeStepGraphs.decode

    def recording_decode(graphs: WholeStepGraphs, *args: Any) -> Any:
        logits = decode(graphs, *args)
        fast.append(logits is not None)
        return logits

    monkeypatch.setattr(WholeStepGraphs, "decode", recording_decode)
    prompts = [p.cuda() for p in ragged((30, 9, 20), hf.config.vocab_size, seed=91)]
    expected = ours(model, "llama", prompts, ignore_eos=True)
    steps.clear()
    assert torch.equal(ours(compiled, "llama", prompts, ignore_eos=True), expected)
    first = steps[0][1]
    assert steps[0][0] == 59 and (first.mode, first.key, first.eager_logits) == \
        (StepMode.PIECEWISE, 64, True)
    # decode steps skip the runner's dispatch: the session replays a whole-step graph itself
    assert len(steps) == 1 and fast == [True] * (STEPS - 1)
