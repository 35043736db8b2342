"""Small modules that spell out the idioms the lifting passes target, the way Hugging Face
models write them (they trace with symbolic_trace and run under Dynamo), and pass helpers."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compiler.capture import symbolic_propagator
from compiler.report import count_flops
from passes import PassContext, PassResult
from passes.base import GraphPass
from tests.fx_helpers import trace


class LlamaRMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in float32, the product with the weight in the input dtype."""

    def __init__(self, hidden: int, eps: float = 1e-6, dim: int = -1) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        self.eps, self.dim = eps, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(self.dim, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's: the weight is stored minus one, and multiplies in float32 before the cast."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        output = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


NORMS: dict[str, type[nn.Module]] = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}


class ResidualStack(nn.Module):
    """Pre-norm blocks: h = norm(x); x = x + proj(h); a final norm of the residual stream."""

    def __init__(self, hidden: int, layers: int, norm: str = "llama") -> None:
        super().__init__()
        self.norms = nn.ModuleList(NORMS[norm](hidden) for _ in range(layers + 1))
        self.projs = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, proj in zip(self.norms, self.projs):
            x = x + proj(norm(x))
        return self.norms[-1](x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "silu_module": nn.SiLU(), "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """Llama's MLP (separate gate and up projections) or Phi3's (one gate_up, chunked)."""

    def __init__(self, hidden: int, inner: int, act: str = "silu", fused: bool = False,
                 up_first: bool = False) -> None:
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden, inner, bias=False)
            self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act, self.fused, self.up_first = ACTIVATIONS[act], fused, up_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gated = up * self.act(gate) if self.up_first else self.act(gate) * up
        return self.down_proj(gated)


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """HF's rotate_half; `half` is the literal `x.shape[-1] // 2` Dynamo records."""
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                 rotary_dim: int) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor; Phi3's partial form when rotary_dim < head_dim."""
    if rotary_dim == head_dim:
        return x * cos + rotate_half(x, rotary_dim // 2) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([x_rot * cos + rotate_half(x_rot, rotary_dim // 2) * sin, x_pass], dim=-1)


class RotaryAttentionInputs(nn.Module):
    """Q and K projections as (batch, heads, seq, head_dim), rotated by cos/sin of
    (batch, seq, rotary_dim) broadcast over heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.head_dim, self.rotary_dim = head_dim, rotary_dim or head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seq, rotary_dim)
        q = apply_rotary(q, cos, sin, self.head_dim, self.rotary_dim)
        k = apply_rotary(k, cos, sin, self.head_dim, self.rotary_dim)
        return q.sum(1) + k.sum(1)  # (batch, seq, head_dim)


def cos_sin(batch: int, seq: int, rotary_dim: int, dtype: torch.dtype = torch.float32,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's (batch, seq, rotary_dim) cos and sin of random positions: halves repeated."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 64, (batch, seq, 1), generator=generator).float()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = torch.cat([positions * inv_freq] * 2, dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def run_pass(pass_type: type[GraphPass], gm: fx.GraphModule,
             inputs: Sequence[Any]) -> PassResult:
    """The pass, a lint, and shape propagation again (what the pass manager does)."""
    result = pass_type(PassContext())(gm)
    gm.graph.lint()
    symbolic_propagator(tuple(inputs))(gm)
    return result


def check_property(module: nn.Module, inputs: Sequence[Any], passes: Sequence[type[GraphPass]],
                   expected_matches: int) -> fx.GraphModule:
    """Runs `passes` in order; the last must match `expected_matches` times. Then: the graph
    computes bitwise what it computed before the last pass (and what the module computes,
    up to the rounding earlier passes such as qkv_fuse may change), the last pass is
    idempotent, and the FLOPs did not go up."""
    gm = trace(module, inputs)
    flops_before = count_flops(gm, inputs)
    for pass_type in passes[:-1]:
        run_pass(pass_type, gm, inputs)
    with torch.no_grad():
        before_last = gm(*inputs)
    assert run_pass(passes[-1], gm, inputs).matches == expected_matches
    code = gm.code
    again = run_pass(passes[-1], gm, inputs)
    assert not again.modified and again.matches == 0 and gm.code == code
    assert count_flops(gm, inputs) <= flops_before
    with torch.no_grad():
        actual, expected = gm(*inputs), module(*inputs)
    assert actual.dtype == before_last.dtype and torch.equal(actual, before_last)
    torch.testing.assert_close(actual, expected, **tolerance(expected.dtype))
    return gm


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """What a different GEMM blocking may change in one layer's result."""
    size = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    return {"rtol": size, "atol": size}


def through_dynamo(module: nn.Module, inputs: Sequence[Any], passes: tuple[str, ...],
                   device: str = "cpu") -> tuple[Any, Any]:
    """`module` compiled with torch.compile and fxkiln's backend running `passes` (weights
    arrive as placeholders); returns the backend (its report) and the compiled output."""
    import compiler
    from compiler import CompileConfig

    torch._dynamo.reset()
    backend = compiler.backend(CompileConfig(device=device, passes=passes, verify=True))
    with torch.no_grad():
        out = torch.compile(module, backend=backend, fullgraph=True)(*inputs)
    return backend, out


class PostNormStack(nn.Module):
    """Post-norm blocks as BART writes them: x = LayerNorm(x + proj(x)), `nn.LayerNorm` with a
    bias or (`bias=False`) without."""

    def __init__(self, hidden: int, layers: int, bias: bool = True) -> None:
        super().__init__()
        self.projs = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, bias=bias) for _ in range(layers))
        with torch.no_grad():
            for norm in self.norms:
                norm.weight.normal_(1.0, 0.1)
                if norm.bias is not None:
                    norm.bias.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, proj in zip(self.norms, self.projs):
            x = norm(x + proj(x))
        return x
