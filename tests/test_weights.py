"""from_hf from a save_pretrained folder (safetensors only) and the errors that name tensors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from models import UnsupportedConfigError, WeightLoadError, from_hf
from models.llama import LlamaForCausalLM
from models.weights import load_weights
from runtime import generate
from tests.model_oracle import (
    build_hf,
    decoder_prompt,
    hf_greedy,
    random_ids,
)


def saved(hf: transformers.PreTrainedModel, folder: Path) -> Path:
    hf.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    return folder


def rewrite(folder: Path, edit: dict[str, str | torch.Tensor | None]) -> None:
    """Rename (str), replace (tensor) or drop (None) tensors of the folder's safetensors file."""
    (file,) = folder.glob("*.safetensors")
    with safe_open(str(file), framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    for name, change in edit.items():
        tensor = tensors.pop(name)
        if isinstance(change, str):
            tensors[change] = tensor
        elif isinstance(change, torch.Tensor):
            tensors[name] = change
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_llama_folder_with_tied_head_generates_hf_tokens(tmp_path: Path) -> None:
    hf = build_hf("llama", seed=1, tie_word_embeddings=True, num_key_value_heads=1)
    model = from_hf(str(saved(hf, tmp_path)))  # the folder has no lm_head.weight: it is tied
    prompt = random_ids((2, 4), 101, seed=2)
    torch.testing.assert_close(generate(model, prompt, 6, ignore_eos=True),
                               hf_greedy(hf, prompt, 6))


def test_bart_folder_generates_hf_tokens(tmp_path: Path) -> None:
    hf = build_hf("bart", seed=3)
    model = from_hf(saved(hf, tmp_path))
    source = random_ids((2, 5), 101, seed=4)
    torch.testing.assert_close(generate(model, None, 6, encoder_input_ids=source, ignore_eos=True),
                               hf_greedy(hf, decoder_prompt(hf, 2), 6, source))


def test_renamed_tensor_is_named_as_unexpected_and_its_old_name_as_missing(tmp_path: Path) -> None:
    folder = saved(build_hf("llama", seed=5), tmp_path)
    old = "model.layers.1.self_attn.k_proj.weight"
    rewrite(folder, {old: "model.layers.1.self_attn.key_proj.weight"})
    with pytest.raises(WeightLoadError) as caught:
        from_hf(folder)
    assert caught.value.tensor_name == "model.layers.1.self_attn.key_proj.weight"
    message = str(caught.value)
    assert "'model.layers.1.self_attn.key_proj.weight'" in message and f"'{old}'" in message


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = saved(build_hf("bart", seed=6), tmp_path)
    rewrite(folder, {"model.decoder.layers.0.encoder_attn.v_proj.bias": None})
    with pytest.raises(WeightLoadError, match=r"missing.*'model\.decoder\.layers\.0\.encoder_attn"
                                              r"\.v_proj\.bias'"):
        from_hf(folder)


def test_misshaped_tensor_is_named_with_expected_and_found_shapes(tmp_path: Path) -> None:
    folder = saved(build_hf("llama", seed=7), tmp_path)
    rewrite(folder, {"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)})
    with pytest.raises(WeightLoadError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*"
                                              r"expected shape \(48, 32\), found \(40, 32\)"):
        from_hf(folder)


def test_folder_without_safetensors_is_refused_without_unpickling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = build_hf("llama", seed=8)
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_hf(tmp_path)


def test_checkpoint_with_qkv_already_stacked_loads_the_same_model() -> None:
    hf = build_hf("llama", seed=9, num_hidden_layers=1)
    state = hf.state_dict()
    attn = "model.layers.0.self_attn."
    stacked = {name: tensor for name, tensor in state.items()
               if not any(name.startswith(f"{attn}{part}_proj") for part in "qkv")}
    stacked[attn + "qkv_proj.weight"] = torch.cat(
        [state[f"{attn}{part}_proj.weight"] for part in "qkv"])
    model = LlamaForCausalLM(hf.config)
    load_weights(model, stacked.items())  # must load whole, and leave nothing missing
    prompt = random_ids((1, 5), 101, seed=10)
    torch.testing.assert_close(generate(model.eval(), prompt, 4, ignore_eos=True),
                               hf_greedy(hf, prompt, 4))


def test_unknown_model_type_names_the_config_key() -> None:
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2,
                                                                vocab_size=11, n_positions=8))
    with pytest.raises(UnsupportedConfigError, match="'model_type'.*'gpt2'"):
        from_hf(gpt2)


def test_a_missing_folder_is_named_before_any_hub_lookup(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"expected a Hugging Face model object or a local "
                                                r"folder saved by save_pretrained, found the path "
                                                r".*no-such-model', which does not exist"):
        from_hf(str(missing))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="which is a file"):
        from_hf(tmp_path / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="with a config.json"):
        from_hf(tmp_path)


def test_a_tensor_in_two_safetensors_files_is_named_with_both(tmp_path: Path) -> None:
    folder = saved(build_hf("llama", seed=11), tmp_path)
    (first,) = folder.glob("*.safetensors")
    with safe_open(str(first), framework="pt") as reader:
        norm = reader.get_tensor("model.norm.weight")
    save_file({"model.norm.weight": norm + 1}, str(folder / "zz-extra.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=rf"checkpoint tensor 'model.norm.weight' is in both "
                                              rf"{first.name} and zz-extra.safetensors") as info:
        from_hf(folder)
    assert info.value.tensor_name == "model.norm.weight"


@pytest.mark.parametrize("tp_size", [0, -2, True, 1.0, "2"])
def test_tp_size_must_be_a_positive_integer(tp_size: object) -> None:
    with pytest.raises(ValueError, match=rf"tp_size: expected an integer >= 1, found "
                                         rf"{re.escape(repr(tp_size))}"):
        from_hf(build_hf("llama"), tp_size=tp_size)  # type: ignore[arg-type]  # the point of the test
