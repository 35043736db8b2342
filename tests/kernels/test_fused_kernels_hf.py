"""Issue 15's correctness bar: fxkiln's BART and Llama, compiled with every Triton kernel chosen
(grouped split decode attention with its fused cache write, add + LayerNorm, the decode GEMV
with its fused GELU / SiLU-and-mul, rotary folded into the attention) and whole decode steps replayed as one
(simulated) graph, generate Hugging Face's greedy float32 tokens. On CPU the kernels run in
Triton's interpreter; on the GPU (marked test) for real."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from compiler import CompileConfig, compile_model
from models import from_hf
from passes import DEFAULT_PIPELINE
from runtime import attention, generate
from runtime.kernels import triton_kernels
from runtime.registry import kernel_ops
from tests.model_oracle import build_hf, decoder_prompt, hf_greedy, random_ids

pytestmark = pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32)
    and not torch.cuda.is_available(), reason="needs Triton (interpreted on CPU) or a GPU")

EVERY_TRITON = {op: "triton" for op in kernel_ops()}
STEPS = 5
CPU_STEPS = 3  # interpreted: a prefill, then two decode steps replayed from one graph
UNFOLDED = tuple(name for name in DEFAULT_PIPELINE if name != "norm_prologue")


def _config(device: str, passes: tuple[str, ...] = DEFAULT_PIPELINE) -> CompileConfig:
    # interpreted on CPU: only the bucket that batch 3 decodes in, and one prefill bucket, which
    # the 18-token prefill replays (each bucket's capture runs every kernel interpreted; the
    # default prefill buckets go up to 2048 tokens)
    cpu = device == "cpu"
    prefill = {"prefill_capture_sizes": (24,)} if cpu else {}
    return CompileConfig(device=device, capture_sizes=(4,) if cpu else (1, 2, 4),
                         kernels=EVERY_TRITON, simulate_capture=cpu, kv_cache_tokens=256,
                         passes=passes, **prefill)


def _tokens_equal_hf(kind: str, device: str, batch: int, seed: int,
                     passes: tuple[str, ...] = DEFAULT_PIPELINE, prologue_rows: int = 8) -> None:
    """`prologue_rows`: every projection's GemvTuning.prologue_rows for the compile (the tiny
    shapes have no tuning, whose default is no prologue): an RMSNorm feeding a GEMV of up to
    that many rows runs in its prologue, the one pass at one row, after a statistics sweep at
    more."""
    with pytest.MonkeyPatch.context() as patch:
        from runtime.kernels import triton_linear

        tuning = triton_linear.gemv_tuning
        patch.setattr(triton_linear, "gemv_tuning", lambda *args: dataclasses.replace(
            tuning(*args), prologue_rows=prologue_rows))
        _compile_and_generate(kind, device, batch, seed, passes, prologue_rows)


def _compile_and_generate(kind: str, device: str, batch: int, seed: int,
                          passes: tuple[str, ...], prologue_rows: int) -> None:
    # interpreted on CPU: one layer (each launch is interpreted; every kernel, the add + norm
    # into the final norm included, runs in one); two on the GPU
    layers = 1 if device == "cpu" else 2
    hf = build_hf(kind, seed=seed, num_key_value_heads=2, num_hidden_layers=layers) \
        if kind == "llama" else build_hf(kind, seed=seed, encoder_layers=layers,
                                         decoder_layers=layers)
    model = from_hf(hf).to(device)
    compiled = compile_model(model, config=_config(device, passes))
    assert set(compiled.report.kernels.values()) == {"triton"}
    folded = "norm_prologue" in passes  # the layers' norms in their GEMVs
    fused = [node.args[-1] for node in compiled.graph_module.graph.nodes
             if getattr(node.target, "__name__", "") in ("norm_linear", "add_norm_linear")]
    assert set(fused) == ({prologue_rows if kind == "llama" else 0} if folded else set())
    norms = {"add_norm_linear"} if folded else {"rms_norm"} if kind == "llama" else set()
    assert {"attention", "linear", *norms, *(() if kind == "llama" else ("fused_add_layer_norm",))
            } <= set(compiled.report.kernels)
    if kind == "llama":  # each rotary rides in its attention (rotated in the decode kernel)
        assert compiled.report.passes["fold_rotary"].matches == layers
        assert "rotary_embedding" not in compiled.report.kernels
    assert compiled.report.decode_graph_sizes == _config(device).capture_sizes
    ids = random_ids((batch, 6), hf.config.vocab_size, seed=seed + batch)
    steps = CPU_STEPS if device == "cpu" else STEPS
    if kind == "bart":
        expected = hf_greedy(hf, decoder_prompt(hf, batch), steps, encoder_ids=ids)
        tokens = generate(compiled, None, steps, encoder_input_ids=ids.to(device),
                          ignore_eos=True)
    else:
        expected = hf_greedy(hf, ids, steps)
        tokens = generate(compiled, ids.to(device), steps, ignore_eos=True)
    assert torch.equal(tokens.cpu(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_every_triton_kernel_generates_hf_tokens_interpreted(kind: str) -> None:
    if not triton_kernels.interpreter_active():
        pytest.skip("Triton kernels are not interpreted here")
    _tokens_equal_hf(kind, "cpu", batch=3, seed=31)  # 3 sequences: one padding row in bucket 4


@pytest.mark.slow
def test_the_one_pass_prologue_gives_hf_tokens_interpreted() -> None:
    """One sequence: each decode step's RMSNorms run in their GEMVs' one-pass prologue (the run
    above, three sequences in a bucket of four, takes the statistics sweep)."""
    if not triton_kernels.interpreter_active():
        pytest.skip("Triton kernels are not interpreted here")
    _tokens_equal_hf("llama", "cpu", batch=1, seed=33, prologue_rows=1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "bart"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prologue", [False, True])
def test_every_triton_kernel_generates_hf_tokens_on_gpu(kind: str, batch: int,
                                                        prologue: bool) -> None:
    _tokens_equal_hf(kind, "cuda", batch=batch, seed=32,
                     passes=DEFAULT_PIPELINE if prologue else UNFOLDED)
