"""The lifting passes on Hugging Face decoder models through `torch.compile(backend=...)`: tiny
configs (2 layers, hidden 64, seeded random weights), every idiom lifted, kernel_choice then
choosing for every lifted op, logits equal to eager in float32 (native and Triton kernels)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import compiler
from compiler import CompileConfig
from passes import DEFAULT_PIPELINE
from runtime.kernels import triton_kernels

LAYERS = 2
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# model_type -> (config class name, extra config, per-head q/k norms)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "llama": ("LlamaConfig", {}, False),
    "mistral": ("MistralConfig", {}, False),
    "qwen2": ("Qwen2Config", {}, False),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, True),
    "gemma": ("GemmaConfig", {"head_dim": 16}, False),  # (1 + weight) norms, gelu-tanh gate
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5, "pad_token_id": 0, "bos_token_id": 1,
                            "eos_token_id": 2}, False),  # fused qkv and gate_up, partial rotary
}
TRITON = {op: "triton" for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul",
                                  "gelu_and_mul", "rotary_cos_sin", "linear", "norm_linear",
                                  "add_norm_linear")}


def hf_model(architecture: str, device: str = "cpu") -> Any:
    import transformers

    config_name, extra, _ = ARCHITECTURES[architecture]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(device).eval()


def expected_matches(architecture: str) -> dict[str, int]:
    """Per decoder layer: two norms (both but the first layer's input norm after a residual
    add), one gated MLP, rotary on q and k; Qwen3 norms q and k per head; one final norm.
    Projections (fused qkv, o, fused gate_up, down per layer; the LM head) become fxkiln.linear,
    SiLU-and-mul folded into gate_up's epilogue (Gemma's GELU-and-mul stays an op of its own);
    each layer's two norms folded into the projection they feed (norm_prologue: one op for the
    pair; the final norm reaches the LM head through the logits' row slice, and stays)."""
    qk_norms = 2 * LAYERS if ARCHITECTURES[architecture][2] else 0
    lifted = {"lift_rms_norm": 2 * LAYERS + 1 + qk_norms, "lift_add_rms_norm": 2 * LAYERS,
              "lift_act_and_mul": LAYERS, "lift_rotary": 2 * LAYERS,
              "linear_epilogue": 4 * LAYERS + 1}
    plain_norms = lifted["lift_rms_norm"] - lifted["lift_add_rms_norm"]
    unfolded_gates = LAYERS if architecture == "gemma" else 0
    lifted["norm_prologue"] = 2 * LAYERS
    lifted["kernel_choice"] = (plain_norms + 2 * LAYERS + unfolded_gates + 2 * LAYERS
                               + lifted["linear_epilogue"] - lifted["norm_prologue"])
    return lifted


def compile_and_compare(architecture: str, config: CompileConfig, device: str = "cpu") -> Any:
    torch._dynamo.reset()  # shared transformers code would pass Dynamo's recompile limit
    model = hf_model(architecture, device)
    backend = compiler.backend(config)
    ids = torch.randint(3, COMMON["vocab_size"], (2, 5), device=device)
    with torch.no_grad():
        expected = model(ids).logits
        actual = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    (report,) = backend.reports
    for name, count in expected_matches(architecture).items():
        assert report.passes[name].matches == count, (name, str(report))
    return report


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_idiom_lifts_and_logits_equal_eager(architecture: str) -> None:
    report = compile_and_compare(architecture, CompileConfig(device="cpu"))
    gates = {"gelu_and_mul"} if architecture == "gemma" else set()  # SiLU: in gate_up's epilogue
    head_norms = {"rms_norm"} if ARCHITECTURES[architecture][2] else set()  # Qwen3's q, k norms
    # the layers' norms ride in their projections; the final add + norm stays (the row slice)
    assert set(report.kernels) == {"norm_linear", "add_norm_linear", "fused_add_rms_norm",
                                   "rotary_cos_sin", "linear", *gates, *head_norms}


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["phi3", "gemma"])
def test_bfloat16_lifting_is_bitwise_exact(architecture: str) -> None:
    """Phi3 fuses its projections itself, so every idiom lifts without qkv_fuse (whose fused
    GEMM need not round as two do). Gemma's bfloat16 norm reads the float32 cast of the sum,
    which fused_add_rms_norm cannot express exactly: its adds stay apart."""
    torch._dynamo.reset()
    model = hf_model(architecture).to(torch.bfloat16)
    passes = tuple(name for name in DEFAULT_PIPELINE if name != "qkv_fuse")
    backend = compiler.backend(CompileConfig(device="cpu", passes=passes))
    ids = torch.randint(3, COMMON["vocab_size"], (2, 5))
    with torch.no_grad():
        expected = model(ids).logits
        actual = torch.compile(model, backend=backend, fullgraph=True)(ids).logits
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)
    matches = {name: record.matches for name, record in backend.reports[-1].passes.items()}
    assert matches["lift_rms_norm"] == 2 * LAYERS + 1 and matches["lift_rotary"] == 2 * LAYERS
    assert matches["lift_add_rms_norm"] == (0 if architecture == "gemma" else 2 * LAYERS)
    assert matches["lift_act_and_mul"] == (0 if architecture == "gemma" else LAYERS)


@pytest.mark.slow
@pytest.mark.skipif(not triton_kernels.interpreter_active(),
                    reason="Triton kernels are not interpreted here")
# Mistral's lifted graph is Llama's (the same idioms and matches, test above, at the same
# widths): its Triton kernels would run the same launches
@pytest.mark.parametrize("architecture", [name for name in ARCHITECTURES if name != "mistral"])
def test_triton_kernels_chosen_explicitly_equal_eager_interpreted(architecture: str) -> None:
    report = compile_and_compare(architecture, CompileConfig(device="cpu", kernels=TRITON))
    assert set(report.kernels.values()) == {"triton"}


@pytest.mark.gpu
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_lifted_models_choose_triton_on_gpu_and_equal_eager(architecture: str) -> None:
    report = compile_and_compare(architecture, CompileConfig(device="cuda"), device="cuda")
    assert set(report.kernels.values()) == {"triton"}
