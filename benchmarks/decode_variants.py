"""The variants of `benchmarks/decode.py`: how each one builds its model and runs a decode step.

Run inside one child process per (model, variant) by `decode.py`; each finished batch becomes
one row (a dict) that the child prints as one JSON line. Every variant sees the same model
(`models.presets.hf_model`, seed 0), the same prompts and the same first decode tokens (drawn
from a seeded CPU generator), and the same context: a prompt of CONTEXT - steps tokens (and
CONTEXT encoder tokens for BART), then warm-up and timed steps of one new token per sequence,
each step feeding the greedy token of the last one: picked as each variant's own `generate`
picks it (`torch.argmax` for Hugging Face's, `runtime.generate`'s token chooser for fxkiln's,
whose argmax is a Triton kernel on CUDA).

Hugging Face variants drive the HF model's forward directly: prefill (the encoder, and the
decoder prompt) runs once, uncompiled, through the base model (no LM head over the prompt);
each step then passes one token per sequence, the cache, and for BART `encoder_outputs`.
transformers 5.17's caches track their own position (`StaticLayer.cumulative_length`); its
forwards take no `cache_position`.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.decode_report import OUR_VARIANTS, SERVING_VARIANTS
from benchmarks.kernel_census import CENSUS_STEPS, kernel_census, session_census, torch_argmax

CONTEXT = 256
WARMUP_STEPS, TIMED_STEPS = 5, 20
SEED = 1234
SAMPLE_ROWS, SAMPLE_COLUMNS = 4, 64

CACHE_OF = {
    "hf-eager": "DynamicCache (EncoderDecoderCache of two for BART), as a user gets by default",
    "hf-compile": "StaticCache (EncoderDecoderCache of two for BART), fixed shapes",
    "hf-compile-reduce-overhead": "StaticCache (EncoderDecoderCache of two for BART), fixed shapes",
    "hf-fxkiln": "StaticCache (EncoderDecoderCache of two for BART), fixed shapes",
    "ours-eager": "fxkiln slot KV cache (runtime.kv_cache) through DecodeSession",
    "fxkiln-passes": "fxkiln slot KV cache (runtime.kv_cache) through DecodeSession",
    "fxkiln-graphs": "fxkiln slot KV cache (runtime.kv_cache) through DecodeSession",
    "hf-serving-passes": "fxkiln slot KV cache, graph-built from the HF model (compile_model(hf))",
    "hf-serving-graphs": "fxkiln slot KV cache, graph-built from the HF model (compile_model(hf))",
}
TORCH_COMPILE_ARGS = {  # variant -> torch.compile keyword arguments (dynamic=False: fixed shapes)
    "hf-compile": dict(dynamic=False),
    "hf-compile-reduce-overhead": dict(mode="reduce-overhead", dynamic=False),
    "hf-fxkiln": dict(dynamic=False),  # backend: fxkiln_backend(batch), graphs for the batch
}


@dataclass
class StepTiming:
    """What timing a decode loop found: per-call seconds of the first two calls, the median."""

    first_call_s: float
    second_call_s: float
    median_ms: float
    first_step_argmax: list[int]
    first_step_logits: list[list[float]]  # logits[:SAMPLE_ROWS, :SAMPLE_COLUMNS] of step one


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[torch.Tensor], torch.Tensor], first_tokens: torch.Tensor,
               device: torch.device, before_step: Callable[[], None] | None = None,
               pick: Callable[[torch.Tensor], torch.Tensor] = torch_argmax) -> StepTiming:
    """Run WARMUP_STEPS + TIMED_STEPS decode steps of `step(tokens (batch,)) -> (batch, vocab)`,
    each one's tokens `pick(logits)` (the greedy token as the variant's own generate picks it).

    Each step is synchronized and timed on the wall clock (host overhead counts, as it does for
    a user); the median is over the timed steps only.
    """
    tokens, seconds, first_argmax, first_logits = first_tokens, [], [], []
    for index in range(WARMUP_STEPS + TIMED_STEPS):
        if before_step is not None:
            before_step()
        sync(device)
        start = time.perf_counter()
        logits = step(tokens)                 # (batch, vocab)
        tokens = pick(logits)                 # (batch,)
        sync(device)
        seconds.append(time.perf_counter() - start)
        if index == 0:
            first_argmax = tokens.tolist()
            first_logits = logits[:SAMPLE_ROWS, :SAMPLE_COLUMNS].float().tolist()
    median_ms = 1e3 * statistics.median(seconds[WARMUP_STEPS:])
    return StepTiming(seconds[0], seconds[1], median_ms, first_argmax, first_logits)


def inputs(vocab: int, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Prompts, encoder sources and first decode tokens, the same in every child process."""
    generator = torch.Generator().manual_seed(SEED + batch)
    prompt_len = CONTEXT - WARMUP_STEPS - TIMED_STEPS
    draw = lambda *shape: torch.randint(3, vocab, shape, generator=generator)  # noqa: E731
    made = {"prompt": draw(batch, prompt_len), "source": draw(batch, CONTEXT),
            "first_tokens": draw(batch)}
    return {name: tensor.to(device) for name, tensor in made.items()}


def decode_weight_bytes(hf: Any) -> int:
    """Bytes of the weights one decode step reads in full.

    Counted: decoder layers and final norms, and the LM head; a token embedding tied to the LM
    head counts once (as the head); an untied one is not counted (a step reads `batch` rows of
    it), nor are positional tables. Not counted for encoder-decoders: the encoder (run once, at
    prefill) and the cross-attention K/V projections (their outputs are cached at prefill).
    """
    head = hf.get_output_embeddings().weight
    total = 0
    for name, parameter in hf.named_parameters():  # tied parameters are listed once
        if parameter is not head and not counts_for_decode(name):
            continue
        total += parameter.numel() * parameter.element_size()
    return total


def counts_for_decode(name: str) -> bool:
    """Whether parameter `name` (not the LM head) is read in full by every decode step."""
    parts = name.split(".")
    skipped = {"encoder", "embed_tokens", "embed_positions", "shared"}
    if skipped.intersection(parts):
        return False
    return not ("encoder_attn" in parts and ("k_proj" in parts or "v_proj" in parts))


def kv_read_bytes(hf: Any, batch: int) -> int:
    """Bytes of KV cache one decode step reads at the full context (self and cross attention)."""
    config = hf.config
    if config.is_encoder_decoder:
        layers, width = config.decoder_layers, config.d_model
        per_token = 2 * width * 2  # self-attention K and V, then cross-attention K and V
    else:
        heads = config.num_key_value_heads
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        layers, per_token = config.num_hidden_layers, 2 * heads * head_dim
    return layers * batch * CONTEXT * per_token * next(hf.parameters()).element_size()


def fxkiln_backend(batch: int) -> Any:
    """The fxkiln backend with device graphs (CUDA; none on CPU) for steps of `batch`
    sequences: Dynamo graphs are captured per signature up to the largest capture size."""
    import compiler

    return compiler.backend(compiler.CompileConfig(capture_sizes=(batch,)))


def hf_stepper(hf: Any, variant: str, made: dict[str, torch.Tensor], backend: Any = None
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prefill `hf` (uncompiled) and return its decode step for `variant` (`backend`: the
    torch.compile backend of hf-fxkiln)."""
    import transformers
    from transformers.modeling_outputs import BaseModelOutput

    config = hf.config.get_text_config(decoder=True)

    def make_cache(length: int = CONTEXT + CENSUS_STEPS) -> Any:
        """A decoder cache has room for the census's steps after the timed ones (_run_hf); a
        cross-attention cache holds the source's CONTEXT positions exactly."""
        if variant == "hf-eager":
            return transformers.DynamicCache(config=config)
        return transformers.StaticCache(config=config, max_cache_len=length)

    options = dict(TORCH_COMPILE_ARGS.get(variant, {}))
    if backend is not None:
        options["backend"] = backend
    forward = hf if variant == "hf-eager" else torch.compile(hf, **options)
    if hf.config.is_encoder_decoder:
        cache = transformers.EncoderDecoderCache(make_cache(), make_cache(CONTEXT))
        prefilled = hf.model(input_ids=made["source"], decoder_input_ids=made["prompt"],
                             past_key_values=cache, use_cache=True)
        encoder_outputs = BaseModelOutput(last_hidden_state=prefilled.encoder_last_hidden_state)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return forward(decoder_input_ids=tokens[:, None], encoder_outputs=encoder_outputs,
                           past_key_values=cache, use_cache=True).logits[:, -1]  # (batch, vocab)
    else:
        cache = make_cache()
        hf.model(input_ids=made["prompt"], past_key_values=cache, use_cache=True)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return forward(input_ids=tokens[:, None], past_key_values=cache,
                           use_cache=True).logits[:, -1]  # (batch, vocab)
    return step


def our_session(step_model: Any, spec_model: Any, batch: int, made: dict[str, torch.Tensor],
                device: torch.device) -> tuple[Any, bool]:
    """Prefill our (eager or compiled) model through DecodeSession; return the session (its
    `decode` is the step) and whether it runs on the compiled runner's own caches (whole-step
    decode graphs).

    The session leases those caches until it is garbage: drop it before the next one."""
    from runtime.generation import DecodeSession

    prompt_len = made["prompt"].shape[1]
    encoder_len = CONTEXT if spec_model.is_encoder_decoder else None
    session = DecodeSession(step_model, batch, prompt_len, CONTEXT - prompt_len + 1, encoder_len,
                            device)
    source = made["source"] if encoder_len else None
    session.prefill(made["prompt"], source)  # logits (batch, prompt_len, vocab), dropped
    state = getattr(step_model, "static_decode", None)
    return session, state is not None and session.kv_caches is state.kv_caches


def greedy_chooser(batch: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The greedy token as `runtime.generate` picks it: its token chooser, whose argmax is the
    kernel chosen for the device (Triton's on CUDA)."""
    from runtime.sampling import SamplingParams, TokenChooser

    return TokenChooser(SamplingParams(), batch, device)


def run_variant(model_name: str, variant: str, batches: list[int], device: torch.device
                ) -> Any:
    """Yield one row per batch for (model, variant): timings, compile and capture figures."""
    from models import from_hf
    from models.presets import TINY_OF, hf_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = model_name if device.type == "cuda" else TINY_OF[model_name]
    hf = hf_model(preset, device, dtype)
    base = {"model": model_name, "preset": preset, "variant": variant, "cache": CACHE_OF[variant]}
    weights, vocab = decode_weight_bytes(hf), hf.config.vocab_size
    kv_bytes = {batch: kv_read_bytes(hf, batch) for batch in batches}
    ours: dict[str, Any] = {}
    if variant in OUR_VARIANTS:
        ours = _compile_ours(from_hf(hf), variant, batches)
        del hf  # ours holds its own copy of the weights
    elif variant in SERVING_VARIANTS:
        ours = _compile_ours(hf, variant, batches)  # the graph reads the HF model's weights
    for batch in batches:
        made = inputs(vocab, batch, device)
        row = {**base, "batch": batch, "weight_bytes": weights, "kv_read_bytes": kv_bytes[batch]}
        with torch.no_grad():
            if ours:
                session, whole_steps = our_session(ours["step_model"], ours["model"], batch,
                                                   made, device)
                pick = greedy_chooser(batch, device)
                timing = time_steps(session.decode, made["first_tokens"], device, pick=pick)
                row.update(ours["figures"], runner_kv_caches=whole_steps)
                row.update(session_census(session, made["first_tokens"], device, pick) or {})
                del session  # releases the runner's caches for the next batch's session
                gc.collect()
            else:
                row.update(_run_hf(hf, variant, made, device))
                timing = row.pop("timing")
        row.update(step_ms=timing.median_ms, first_call_s=timing.first_call_s,
                   first_step_argmax=timing.first_step_argmax,
                   first_step_logits=timing.first_step_logits)
        yield row


def _compile_ours(model: Any, variant: str, batches: list[int]) -> dict[str, Any]:
    from compiler import CompileConfig, compile_model

    if variant == "ours-eager":
        return {"model": model, "step_model": model,
                "figures": {"compile_s": None, "capture_s": None, "graph_memory_bytes": None}}
    sizes = tuple(sorted({1, 2, 4, 8, 16, 32, *batches})) if variant.endswith("-graphs") else ()
    # the runner's KV caches hold the largest batch at the full context: whole-step graphs
    config = CompileConfig(capture_sizes=sizes, kv_cache_tokens=max(batches) * (CONTEXT + 1))
    compiled = compile_model(model, config=config)  # an HF model: its serving graph
    report = compiled.report
    captured = bool(report.captured_sizes)  # none on CPU: the pieces run eagerly there
    figures = {"compile_s": report.compile_seconds, "capture_sizes": list(report.captured_sizes),
               "decode_graph_sizes": list(report.decode_graph_sizes),
               "capture_s": report.capture_seconds if captured else None,
               "graph_memory_bytes": report.graph_memory_bytes if captured else None}
    return {"model": compiled.model, "step_model": compiled, "figures": figures}


def _run_hf(hf: Any, variant: str, made: dict[str, torch.Tensor], device: torch.device
            ) -> dict[str, Any]:
    """Time one batch of a Hugging Face variant; torch.compile variants compile afresh."""
    compiled = variant != "hf-eager"
    if compiled:
        import compiler  # noqa: F401  (registers the "fxkiln" backend)

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    backend = fxkiln_backend(made["first_tokens"].shape[0]) if variant == "hf-fxkiln" else None
    step = hf_stepper(hf, variant, made, backend)  # prefilled: the cache is allocated by now
    reserved_before = 0
    if device.type == "cuda":  # hand back what the last batch's graphs left in the allocator
        gc.collect()
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(device)
    mark_step = None
    if variant == "hf-compile-reduce-overhead":
        mark_step = torch.compiler.cudagraph_mark_step_begin
    timing = time_steps(step, made["first_tokens"], device, before_step=mark_step)
    row: dict[str, Any] = {"timing": timing, "compile_s": None, "capture_s": None,
                           "graph_memory_bytes": None}
    if compiled:  # the peers' kernels too, beside fxkiln's (CUDA only)
        row.update(_hf_census(step, made["first_tokens"], device, mark_step) or {})
    if compiled:
        row["compile_s"] = timing.first_call_s
        row["dynamo_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    if backend is not None:
        row.update(fxkiln_runtime(backend.reports[-1]))
    if variant == "hf-compile-reduce-overhead" and device.type == "cuda":  # CPU: no graphs
        row["capture_s"] = timing.second_call_s  # cudagraph trees record on the second call
        # the memory pool and workspace the compiled graphs kept
        row["graph_memory_bytes"] = torch.cuda.memory_reserved(device) - reserved_before
    return row


def _hf_census(step: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
               device: torch.device, before_step: Callable[[], None] | None
               ) -> dict[str, Any] | None:
    """The kernel census of CENSUS_STEPS more steps of a Hugging Face variant (its static cache
    has room for them past the timed steps)."""
    current = [tokens]

    def census_step() -> None:
        if before_step is not None:
            before_step()
        current[0] = torch_argmax(step(current[0]))

    return kernel_census(census_step, device)


def fxkiln_runtime(report: Any) -> dict[str, Any]:
    """What the backend's runner did with the decode step's graph (its report)."""
    captured = bool(report.captured_sizes)
    return {"capture_s": report.capture_seconds if captured else None,
            "graph_memory_bytes": report.graph_memory_bytes if captured else None,
            "fxkiln_pieces": report.pieces, "fxkiln_captured_sizes": list(report.captured_sizes),
            "fxkiln_capture_note": report.capture_note}
