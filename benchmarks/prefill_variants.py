"""The variants of `benchmarks/prefill.py`: how each one generates, and what a row measures.

Run inside one child process per (model, variant, workload) by `prefill.py`; each batch
becomes one row (a dict). Every variant sees the same model (`models.presets.hf_model`, seed
0) and the same prompts (drawn from a seeded CPU generator); greedy, EOS off, so every
sequence generates `new_tokens` tokens (an EOS id is just a token; Hugging Face runs with
`eos_token_id=None`, not `min_new_tokens`, which would mask EOS out and change the tokens).

  time to first token: one `generate(..., max_new_tokens=1)` call (prefill + the first token,
      setup included, as a user waits for it), median of RUNS after a warm-up call;
  end to end: one `generate(..., max_new_tokens=new_tokens)`; tokens/s = batch * new_tokens / s.

Hugging Face gets ragged prompts left-padded with an attention mask (what its decoder-only
generate needs); fxkiln gets the list of prompts.
"""
from __future__ import annotations

import gc
import hashlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

SEED = 1234
MIXED = (333, 1024, 96, 512, 17, 768, 256, 40)  # batch b takes the first b
WORKLOADS = ("128", "1024", "mixed")
NOTES = {
    "hf-eager": "HF generate, default DynamicCache, eager forward",
    "hf-compile": "HF generate with cache_implementation='static': HF compiles the decode steps "
                  "with torch.compile (its CompileConfig: mode reduce-overhead on CUDA, default "
                  "on CPU); prefill runs uncompiled, as in HF",
    "ours-eager": "fxkiln's model (models.from_hf), runtime.generate, eager",
    "fxkiln-graphs": "compile_model(ours), default config: passes, piecewise graphs, whole-step "
                     "decode graphs; prefill steps up to 2048 tokens replay piecewise graphs per "
                     "prefill bucket (varlen attention and the LM head eager), longer ones eager",
    "fxkiln-eager-prefill": "fxkiln-graphs with prefill_capture_sizes=() (prefill steps past the "
                            "decode buckets run eagerly: what the prefill graphs save)",
    "fxkiln-chunked": "fxkiln-graphs with prefill_chunk_tokens=256 (chunked prefill mixed with "
                      "decode steps)",
    "fxkiln-native-attention": "fxkiln-graphs with kernels={'attention': 'native'} (one SDPA "
                               "call per sequence at prefill; decode steps piecewise)",
}
VARIANTS = tuple(NOTES)
OURS = ("ours-eager", "fxkiln-graphs", "fxkiln-eager-prefill", "fxkiln-chunked",
        "fxkiln-native-attention")


def prompt_lengths(workload: str, batch: int) -> list[int]:
    if workload == "mixed":
        if batch > len(MIXED):
            raise ValueError(f"mixed workload: at most {len(MIXED)} prompts, found batch {batch}")
        return list(MIXED[:batch])
    return [int(workload)] * batch


def make_prompts(lengths: list[int], vocab: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + sum(lengths))
    return [torch.randint(3, vocab, (n,), generator=generator).to(device) for n in lengths]


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[0] for p in prompts)
    ids = prompts[0].new_full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[0]:], mask[row, width - prompt.shape[0]:] = prompt, 1
    return ids, mask


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], torch.Tensor], device: torch.device, runs: int
          ) -> tuple[float, torch.Tensor]:
    """(median seconds of `runs` calls after one warm-up call, the last call's tokens)."""
    tokens = call()
    seconds = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        tokens = call()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), tokens


def hf_generator(hf: Any, variant: str, device: torch.device
                 ) -> Callable[[list[torch.Tensor], int], torch.Tensor]:
    """prompts, new_tokens -> (batch, new_tokens) tokens through HF `generate`."""
    import transformers

    options: dict[str, Any] = {}
    if variant == "hf-compile":
        compile_config = transformers.CompileConfig(mode="reduce-overhead" if device.type == "cuda"
                                                    else "default")
        compile_config._compile_all_devices = device.type != "cuda"  # HF compiles CUDA only
        options = dict(cache_implementation="static", compile_config=compile_config)

    def run(prompts: list[torch.Tensor], new_tokens: int) -> torch.Tensor:
        ids, mask = left_padded(prompts, pad=0)
        # EOS off through eos_token_id=None (min_new_tokens would mask EOS out of the argmax)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                          eos_token_id=None, do_sample=False, num_beams=1, pad_token_id=0,
                          **options)
        return out[:, ids.shape[1]:]
    return run


def our_generator(hf: Any, variant: str, device: torch.device
                  ) -> tuple[Callable[[list[torch.Tensor], int], torch.Tensor], dict[str, Any]]:
    """(prompts, new_tokens -> tokens through runtime.generate, compile figures)."""
    from compiler import CompileConfig, compile_model
    from models import from_hf
    from runtime import generate

    model = from_hf(hf)
    figures: dict[str, Any] = {}
    runner: Any = model
    if variant != "ours-eager":
        kernels = {"attention": "native"} if variant == "fxkiln-native-attention" else {}
        config = CompileConfig(kernels=kernels)
        if variant == "fxkiln-eager-prefill":
            config = config.replace(prefill_capture_sizes=())
        compiled = compile_model(model, config=config)
        report = compiled.report
        figures = dict(compile_s=report.compile_seconds, capture_s=report.capture_seconds,
                       graph_mib=report.graph_memory_bytes / 2**20,
                       kv_cache_tokens=report.kv_cache_tokens,
                       captured_sizes=list(report.captured_sizes),
                       attention_kernel=report.kernels.get("attention"))
        runner = compiled
    chunk = 256 if variant == "fxkiln-chunked" else None

    def run(prompts: list[torch.Tensor], new_tokens: int) -> torch.Tensor:
        return generate(runner, prompts, new_tokens, ignore_eos=True, prefill_chunk_tokens=chunk)
    return run, figures


def run_variant(model_name: str, variant: str, workload: str, batches: list[int],
                device: torch.device, new_tokens: int, runs: int) -> Any:
    """Yield one row per batch for (model, variant, workload)."""
    from models.presets import TINY_OF, hf_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = model_name if device.type == "cuda" else TINY_OF[model_name]
    hf = hf_model(preset, device, dtype)
    figures: dict[str, Any] = {}
    if variant in OURS:
        generate_fn, figures = our_generator(hf, variant, device)
    else:
        generate_fn = hf_generator(hf, variant, device)
    vocab = hf.config.vocab_size
    for batch in batches:
        lengths = prompt_lengths(workload, batch)
        prompts = make_prompts(lengths, vocab, device)
        with torch.no_grad():
            ttft_s, _ = timed(lambda: generate_fn(prompts, 1), device, runs)
            e2e_s, tokens = timed(lambda: generate_fn(prompts, new_tokens), device, runs)
        yield {"model": model_name, "variant": variant, "workload": workload, "batch": batch,
               "prompt_tokens": sum(lengths), "new_tokens": new_tokens,
               "ttft_ms": 1e3 * ttft_s, "e2e_s": e2e_s,
               "tokens_per_s": batch * new_tokens / e2e_s,
               "sequence_hashes": [_digest(row) for row in tokens.cpu().tolist()],
               "note": NOTES[variant], **figures}
        gc.collect()


def _digest(tokens: list[int]) -> str:
    return hashlib.sha256(repr(tokens).encode()).hexdigest()[:16]
