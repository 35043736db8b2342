"""compile_model(hf_model): Hugging Face models become serving graphs that runtime.generate
drives; float32 greedy tokens equal Hugging Face's generate for every covered architecture."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import compiler.hf_serving
from compiler import CompileConfig, compile_model
from compiler.capture import ShapePropagator, symbolic_propagator
from compiler.shape_refresh import RefreshStats
from compiler.hf_capture import UnsupportedModelError, capture_hf
from compiler.hf_serving import PROPAGATION_TOKENS, HFServingModel, example_inputs, serving_model
from passes.attention_match import UnsupportedAttentionError
from passes.token_streams import DECODER, token_streams
from runtime import attention, generate
from runtime.kv_cache import AttentionKind
from tests.fx_helpers import assert_fresh, checked_refreshes, output_value
from tests.hf_models import DECODER_ONLY, ENCODER_DECODER, build, prompt_for
from tests.model_oracle import hf_generate_eos, hf_greedy, hf_logits, random_ids, step_logits

PLAIN = CompileConfig(device="cpu", capture_sizes=())  # no runner: the rewritten graph itself
# one bucket, the one batch 3 decodes in: each bucket's capture runs the Triton interpreter;
# prefill buckets that the 15-token prompts of batch 3 would replay, were they kept
WHOLE = CompileConfig(device="cpu", capture_sizes=(4,), simulate_capture=True, debug=True,
                      kernels={"attention": "triton"}, kv_cache_tokens=256,
                      prefill_capture_sizes=(8, 16))
NEW_TOKENS = 8
# architectures whose compile checks every shape refresh against a full propagation (one more
# propagation per refresh): one of each family of passes that fire (GQA and rotary, q/k norms,
# Gemma's norm, fused qkv, Conv1D and learned positions, encoder-decoder); Whisper has its own
STALENESS_CHECKED = frozenset({"llama", "qwen3", "gemma", "phi3", "gpt2", "bart"})
# layers (per stack) of each architecture's `plain` compile: two for one decoder-only and one
# encoder-decoder model, which show several layers' caches and attention specs in one graph
# (the same code for every architecture); one for the others, whose layers all run their
# first layer's code, which the passes rewrite the same way in each. The encoder-decoder with
# two is mBART, not BART: BART's compile is staleness-checked (a full propagation after every
# refresh, 14 s of CPU at two layers), and Llama's two layers check refreshes of a multi-layer
# graph already
LAYERS = dict.fromkeys([*DECODER_ONLY, *ENCODER_DECODER], 1) | {"llama": 2, "mbart": 2}


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()  # many captures in one process: stay clear of the recompile limit


@pytest.fixture(scope="module")
def refresh_checks() -> dict[str, list[tuple[RefreshStats, list[str]]]]:
    """Per architecture, each shape refresh of its `plain` compile and how its values differ
    from a full propagation's (tests/fx_helpers.checked_refreshes)."""
    return {}


@pytest.fixture(scope="module")
def plain(refresh_checks) -> Callable[[str], tuple[transformers.PreTrainedModel, Any]]:
    """`build(name)` and its PLAIN compile, made once per module and worker (a capture costs
    seconds), shared by the tests that check different things of the same compiled model."""
    made: dict[str, tuple[transformers.PreTrainedModel, Any]] = {}

    def get(name: str) -> tuple[transformers.PreTrainedModel, Any]:
        if name not in made:
            torch._dynamo.reset()
            hf = build(name, layers=LAYERS[name])
            checking = checked_refreshes() if name in STALENESS_CHECKED else nullcontext([])
            with checking as checks:
                made[name] = hf, compile_model(hf, config=PLAIN)
            refresh_checks[name] = checks
        return made[name]
    return get


def hf_tokens(hf: transformers.PreTrainedModel, batch: int = 2) -> tuple[torch.Tensor, ...]:
    prompt, source = prompt_for(hf, batch)
    return prompt, source, hf_greedy(hf, prompt, NEW_TOKENS, source)


def test_tiny_llama_generates_hugging_face_tokens() -> None:
    """The fast path of this file: one Llama layer, compiled from the HF object alone; the
    serving model's weights are the HF model's own tensors (no copy)."""
    hf = build("llama")
    hf.model.layers = hf.model.layers[:1].eval()
    hf.config.num_hidden_layers = 1
    prompt, _, expected = hf_tokens(hf)
    compiled = compile_model(hf, config=PLAIN)
    assert torch.equal(generate(compiled, prompt, NEW_TOKENS, ignore_eos=True), expected)
    assert compiled.report.frontend == "hf_serving"
    own = {id(t) for t in [*hf.parameters(), *hf.buffers()]}
    assert isinstance(compiled.model, HFServingModel)
    assert all(id(t) in own for t in [*compiled.model.parameters(), *compiled.model.buffers()])
    assert compiled.report.passes["cached_attention"].matches == 1
    (spec,) = compiled.model.attention_specs().values()
    assert (spec.num_heads, spec.num_kv_heads, spec.head_size, spec.kind) == \
        (4, 2, 8, AttentionKind.DECODER)


# qkv_fuse's matches per layer: Q/K/V and gate/up of each Llama-family layer; Q/K/V of OPT's
# (its fc1 has no partner); none where the model already fuses them (Phi3) or projects through
# Conv1D's addmm (GPT-2); self Q/K/V and cross K/V of each seq2seq layer, encoder's too.
FUSED = dict(llama=2, mistral=2, qwen2=2, qwen3=2, gemma=2, phi3=0, gpt2=0, opt=1, bart=3,
             mbart=3, marian=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*DECODER_ONLY, *ENCODER_DECODER])
def test_greedy_tokens_equal_hugging_face(plain, refresh_checks, name: str) -> None:
    """Also: both pipelines (serving passes, then the default ones) refreshed shapes
    incrementally after each pass that changed the graph, and every node's value has the
    metadata a full propagation gives it (shape with its symbols, stride, dtype, device)."""
    hf, compiled = plain(name)
    prompt, source, expected = hf_tokens(hf)
    tokens = generate(compiled, prompt, NEW_TOKENS, source, ignore_eos=True)
    assert torch.equal(tokens, expected)
    if name in STALENESS_CHECKED:
        assert_fresh(refresh_checks[name])
    passes, layers = compiled.report.passes, LAYERS[name]
    attentions = ["cross", "decoder", "encoder"] if hf.config.is_encoder_decoder else ["decoder"]
    assert passes["cached_attention"].matches == len(attentions) * layers
    assert (passes["qkv_fuse"].matches, passes["qkv_split"].matches) == (FUSED[name] * layers, 0)
    if hf.config.is_encoder_decoder:  # BART's attentions are encoder, decoder and cross
        kinds = sorted(spec.kind.value for spec in compiled.model.attention_specs().values())
        assert kinds == sorted(attentions * layers)
        assert passes["token_positions"].matches == 2  # encoder and decoder


@pytest.mark.slow
def test_eos_compaction_and_seeded_sampling(plain) -> None:
    """EOS drops finished rows (HF's tokens, pad after EOS); sampling with a seed gives the
    same tokens compiled and through the uncompiled serving model."""
    hf, compiled = plain("qwen2")
    prompt = random_ids((4, 5), hf.config.vocab_size, seed=3)
    free = hf_greedy(hf, prompt, NEW_TOKENS)
    eos = int(free[1, 2])
    expected = hf_generate_eos(hf, prompt, NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(generate(compiled, prompt, NEW_TOKENS, eos_token_id=eos,
                                pad_token_id=0), expected)
    options = dict(ignore_eos=True, do_sample=True, temperature=0.9, top_k=20, seed=7)
    assert torch.equal(generate(compiled, prompt, NEW_TOKENS, **options),
                       generate(compiled.model, prompt, NEW_TOKENS, **options))


@pytest.mark.slow
def test_t5_relative_position_bias_is_refused_naming_the_node() -> None:
    with pytest.raises(UnsupportedAttentionError, match="relative_attention_bias") as error:
        compile_model(build("t5", layers=1), config=PLAIN)
    assert "cannot serve the attention at node %" in str(error.value)
    assert "a bias added to the scores" in str(error.value)


@pytest.mark.slow
def test_a_sliding_window_shorter_than_the_positions_served_is_refused() -> None:
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=16)).eval()
    with pytest.raises(UnsupportedAttentionError, match="query 16 does not see key 0"):
        compile_model(hf, config=PLAIN)


def test_a_concrete_token_count_after_propagation_is_refused(monkeypatch) -> None:
    """Shape propagation that fakes the token count as a number (torch 2.11 did, for fake
    inputs without a source) would let the mask proof probe one count against another: the
    serving passes refuse to run on such a graph."""
    def static_propagator(inputs):
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        return ShapePropagator(mode, tuple(mode.from_tensor(v, static_shapes=True)
                                           for v in inputs))

    monkeypatch.setattr(compiler.hf_serving, "symbolic_propagator", static_propagator)
    with pytest.raises(RuntimeError, match="decoder token count concrete"):
        serving_model(build("llama", layers=1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bart"])
def test_every_token_stream_stays_a_symbol_through_propagation(name: str) -> None:
    """The graph as Dynamo exported it (rotary's `inv_freq @ positions`, the projections and
    attention's matmuls as captured): after shape propagation each stream's count is a symbol
    that no guard fixed to the example's count, and the logits' rows are the decoder's count.
    (torch 2.11's C++ matmul and linear fixed them, propagated without the Python dispatcher.)"""
    hf = build(name, layers=1)
    gm = capture_hf(hf)
    inputs = example_inputs(hf.config, None, PROPAGATION_TOKENS, torch.device("cpu"),
                            torch.float32)
    propagate = symbolic_propagator(inputs)
    propagate(gm)
    replacements = propagate.fake_mode.shape_env.replacements
    streams = token_streams(gm)
    assert len(streams) == (2 if hf.config.is_encoder_decoder else 1)
    for stream in streams.values():
        assert stream.symbols()
        assert not any(replacements.get(symbol, symbol).is_number for symbol in stream.symbols())
    rows = output_value(gm).shape[0]
    assert isinstance(rows, torch.SymInt) and \
        rows.node.expr.free_symbols <= streams[DECODER].symbols()


def test_models_that_are_no_lm_are_refused_before_capture() -> None:
    base = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(UnsupportedModelError, match="no LM head"):
        compile_model(base, config=PLAIN)
    lm = build("llama").train()
    with pytest.raises(ValueError, match="training mode"):  # refused before capture
        compile_model(lm, config=PLAIN)


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(kv_heads=st.integers(1, 2), groups=st.integers(1, 3), head_size=st.sampled_from([4, 8]),
       steps=st.integers(1, 3), seed=st.integers(0, 99))
def test_serving_graph_step_logits_equal_the_hf_forward(kv_heads: int, groups: int,
                                                        head_size: int, steps: int,
                                                        seed: int) -> None:
    """Real HF Llama attention with any head layout: a prefill and decode steps through the
    serving graph give HF's logits for the whole sequences."""
    torch._dynamo.reset()
    heads = kv_heads * groups
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=heads * head_size,
                                      intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      head_dim=head_size, max_position_embeddings=32)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    model, _ = serving_model(hf)
    tokens = random_ids((2, 4 + steps), 61, seed)
    torch.testing.assert_close(step_logits(model, tokens[:, :4], tokens[:, 4:]),
                               hf_logits(hf, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(attention.attention_jit is None, reason="needs Triton (interpreted on CPU)")
# BART with one layer per stack: its three attentions a layer each run Triton interpreted; Llama's
# two layers show several layers' caches in one whole-step graph
@pytest.mark.parametrize("name, layers", [("llama", 2), ("bart", 1)])
def test_decode_steps_replay_whole_step_graphs(name: str, layers: int, replays: list) -> None:
    """The runner's bucketed pieces and whole-step decode graphs (simulated on CPU, graph-safe
    Triton attention) serve the HF graph as they serve fxkiln's own models: each decode step
    of a batch within the buckets is one replay, and the tokens are HF's. HF serving graphs
    compute every row's logits (prefill graphs would hold them all): prefill buckets are
    dropped and the prefill runs eagerly."""
    hf = build(name, layers=layers)
    prompt, source = prompt_for(hf, 3)
    compiled = compile_model(hf, config=WHOLE)
    assert compiled.report.decode_graph_sizes == (4,) and compiled.report.pieces > 1
    assert compiled.report.captured_sizes == (4,) and compiled.report.prefill_graph_sizes == ()
    before = len(replays)  # 3 tokens: a prefill, then two decode steps (Triton interpreted)
    tokens = generate(compiled, prompt, 3, source, ignore_eos=True)
    assert torch.equal(tokens, hf_greedy(hf, prompt, 3, source))
    assert len(replays) - before == 2  # the two decode steps after the prefill


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "bart"])
def test_cuda_graphs_give_hugging_face_tokens(name: str) -> None:
    """On CUDA (default config: piecewise CUDA graphs, whole-step decode graphs), float32
    greedy tokens equal HF's, with sequences finishing at EOS along the way."""
    hf = build(name).to("cuda")
    prompt, source = prompt_for(hf, 5)
    prompt, source = prompt.cuda(), None if source is None else source.cuda()
    compiled = compile_model(hf, config=CompileConfig(device="cuda", kv_cache_tokens=1024))
    assert compiled.report.decode_graph_sizes
    expected = hf_greedy(hf, prompt, NEW_TOKENS, source)
    assert torch.equal(generate(compiled, prompt, NEW_TOKENS, source, ignore_eos=True), expected)
    eos = int(expected[0, 2].item())
    with_eos = hf_generate_eos(hf, prompt, NEW_TOKENS, eos_token_id=eos, pad_token_id=0,
                               encoder_ids=source)
    assert torch.equal(generate(compiled, prompt, NEW_TOKENS, source, eos_token_id=eos,
                                pad_token_id=0), with_eos)


@pytest.mark.slow
def test_a_save_pretrained_folder_goes_the_same_way(tmp_path) -> None:
    """A checkpoint folder loads through transformers and compiles like the object it came from."""
    build("qwen2", layers=1).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    prompt, _, expected = hf_tokens(hf)
    assert torch.equal(generate(compile_model(hf, config=PLAIN), prompt, NEW_TOKENS,
                                ignore_eos=True), expected)


@pytest.mark.slow
def test_whisper_reads_features_and_generates_hugging_face_tokens() -> None:
    """Whisper's encoder reads features (sequences, mel bins, frames), a batched stream;
    `generate` takes them by keyword. Step logits equal HF's forward; greedy tokens equal HF's
    generic greedy search (GenerationMixin.generate: Whisper's own generate adds language and
    timestamp logic that a random tiny config does not have)."""
    hf = build("whisper", layers=1)  # several layers: LAYERS' llama and mbart
    prompt, features = prompt_for(hf, 3)
    with checked_refreshes() as checks:
        compiled = compile_model(hf, config=PLAIN)
    assert_fresh(checks)
    kinds = sorted(spec.kind.value for spec in compiled.model.attention_specs().values())
    assert kinds == ["cross", "decoder", "encoder"]
    continuation = random_ids((3, 3), hf.config.vocab_size, seed=5)
    tokens = torch.cat([prompt, continuation], dim=1)
    with torch.no_grad():
        expected_logits = hf(input_features=features, decoder_input_ids=tokens).logits
    torch.testing.assert_close(step_logits(compiled, prompt, continuation, features),
                               expected_logits, rtol=1e-4, atol=1e-4)
    expected = transformers.GenerationMixin.generate(
        hf, features, decoder_input_ids=prompt, max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=None,
        pad_token_id=0)[:, 1:]
    assert torch.equal(generate(compiled, prompt, NEW_TOKENS, input_features=features,
                                ignore_eos=True), expected)
