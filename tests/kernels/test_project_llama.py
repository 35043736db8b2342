"""kernel_choice on the project's own Llama (models.llama), run through runtime.generate."""
from __future__ import annotations

import pytest
import torch

from models import from_hf
from passes.kernel_choice import MATCHED_TARGETS, chosen_kernels
from runtime import generate, registry, settings
from runtime.kernels import triton_kernels
from tests.kernels.helpers import choose_kernels, count_targets
from tests.model_oracle import build_hf, random_ids
from tests.fx_helpers import trace

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")


class CompiledGraph:
    """What generate needs of a compiled model: callable, with the project model as `.model`."""

    def __init__(self, gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
        self.gm, self.model = gm, model

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.gm(*inputs)


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("kernel settings were read at run time")


@needs_interpreter
def test_project_llama_with_triton_norms_generates_eager_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    layers = 2
    model = from_hf(build_hf("llama", seed=4, num_key_value_heads=2, num_hidden_layers=layers))
    gm = trace(model, model.example_inputs(8))
    result = choose_kernels(gm, {"rms_norm": "triton", "fused_add_rms_norm": "triton"})
    assert result.matches == 5 * layers + 1  # per layer 2 norms, rotary, silu, attention; norm
    assert count_targets(gm, set(MATCHED_TARGETS)) == 0
    assert chosen_kernels(gm) == {"rms_norm": "triton", "fused_add_rms_norm": "triton",
                                  "rotary_embedding": "native", "silu_and_mul": "native",
                                  "attention": "native"}
    prompt = random_ids((2, 4), model.config.vocab_size, seed=5)
    expected = generate(model, prompt, max_new_tokens=3, ignore_eos=True)
    monkeypatch.setattr(settings, "active_kernel_choice", _refuse)
    choose, token_choices = registry.choose_kernel, []

    def only_the_token_argmax(op: str, *args: object) -> object:
        """The graph chooses nothing; generate's token chooser picks its argmax once."""
        if op != "argmax" or token_choices:
            _refuse()
        token_choices.append(op)
        return choose(op, *args)

    monkeypatch.setattr(registry, "choose_kernel", only_the_token_argmax)
    torch.testing.assert_close(generate(CompiledGraph(gm, model), prompt, max_new_tokens=3,
                                        ignore_eos=True),
                               expected, rtol=0, atol=0)
