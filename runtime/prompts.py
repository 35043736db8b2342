"""A generation request's inputs, normalized and checked before any work is done.

Prompts arrive as Hugging Face users pass them: a `(batch, length)` tensor of equal-length
prompts, the same tensor padded (left or right) with an `attention_mask` (1 = token, 0 = pad),
or a list of 1-D prompts of any length. Each becomes the 1-D tensor of its real tokens, which
generation runs exactly as if that sequence were alone. Token ids are checked against the
vocabulary, and the lengths against the model's positions, before the first step: an
error names the sequence, the bad id or length, and the limit.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

PromptsInput = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class Request:
    """A checked request: one 1-D prompt per sequence (and encoder input, for
    encoder-decoder models: 1-D token ids, or features such as Whisper's (mel bins, frames)),
    all on `device`. `encoder_lens`: encoder tokens per sequence, as the model counts them."""

    prompts: tuple[torch.Tensor, ...]
    encoder_inputs: tuple[torch.Tensor, ...] | None
    encoder_lens: list[int] | None
    device: torch.device

    @property
    def prompt_lens(self) -> list[int]:
        return [p.shape[0] for p in self.prompts]


def prepare_request(model: Any, input_ids: PromptsInput | None,
                    attention_mask: torch.Tensor | None, encoder_input_ids: PromptsInput | None,
                    encoder_attention_mask: torch.Tensor | None,
                    max_new_tokens: Any, input_features: torch.Tensor | None = None) -> Request:
    """`generate`'s inputs as a `Request`, or a ValueError before any work (see the module)."""
    check_max_new_tokens(max_new_tokens)
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    encoder_inputs = None
    if model.is_encoder_decoder:
        encoder_inputs = _encoder_inputs(model, encoder_input_ids, encoder_attention_mask,
                                         input_features)
        if input_ids is None:
            start = getattr(model, "decoder_start_token_id", None)
            if start is None:
                raise ValueError("generate: input_ids is None and the model has no "
                                 "decoder_start_token_id")
            input_ids = [torch.full((1,), start, dtype=torch.long, device=e.device)
                         for e in encoder_inputs]
    elif encoder_input_ids is not None or encoder_attention_mask is not None \
            or input_features is not None:
        raise ValueError("generate: encoder_input_ids or input_features given to a "
                         "decoder-only model")
    if input_ids is None:
        raise ValueError("generate: expected input_ids (a (batch, length) tensor or a list of "
                         "1-D prompts), found None")
    device = encoder_inputs[0].device if encoder_inputs else getattr(model, "device", None)
    prompts = as_prompts("input_ids", input_ids, attention_mask, device)
    if encoder_inputs is not None and len(encoder_inputs) != len(prompts):
        raise ValueError(f"generate: input_ids has {len(prompts)} prompts but the encoder "
                         f"input has {len(encoder_inputs)}")
    check_ids("input_ids", prompts, vocab_size)
    check_lengths("input_ids", [p.shape[0] for p in prompts], max_positions, max_new_tokens)
    device = prompts[0].device
    for name, tensors in (("input_ids", prompts), ("encoder input", encoder_inputs or [])):
        for index, tensor in enumerate(tensors):
            if tensor.device != device:
                raise ValueError(f"generate: {name} {index} is on {tensor.device}; "
                                 f"expected every input on {device} (the first prompt's)")
    encoder_lens = (None if encoder_inputs is None else
                    [model.encoder_length(e.unsqueeze(0)) for e in encoder_inputs])
    return Request(tuple(prompts), None if encoder_inputs is None else tuple(encoder_inputs),
                   encoder_lens, device)


def _encoder_inputs(model: Any, encoder_input_ids: PromptsInput | None,
                    encoder_attention_mask: torch.Tensor | None,
                    input_features: torch.Tensor | None) -> list[torch.Tensor]:
    """An encoder-decoder model's encoder input per sequence: 1-D token ids (checked against
    the vocabulary and positions), or one row of `input_features` (batch, ...) each."""
    if input_features is not None:
        if encoder_input_ids is not None or encoder_attention_mask is not None:
            raise ValueError("generate: expected encoder_input_ids or input_features, found "
                             "both")
        if not isinstance(input_features, torch.Tensor) or input_features.dim() < 2 \
                or input_features.shape[0] == 0:
            found = (tuple(input_features.shape) if isinstance(input_features, torch.Tensor)
                     else type(input_features).__name__)
            raise ValueError(f"generate: input_features: expected a (batch, ...) tensor of at "
                             f"least one sequence's features, found {found}")
        return list(input_features.unbind(0))
    if encoder_input_ids is None:
        raise ValueError("generate: an encoder-decoder model needs encoder_input_ids "
                         "(a (batch, source_len) tensor or a list of 1-D inputs) or "
                         "input_features, found neither")
    config = getattr(model, "config", None)
    inputs = as_prompts("encoder_input_ids", encoder_input_ids, encoder_attention_mask,
                        getattr(model, "device", None))
    check_ids("encoder_input_ids", inputs, getattr(config, "vocab_size", None))
    check_lengths("encoder_input_ids", [e.shape[0] for e in inputs],
                  getattr(config, "max_position_embeddings", None))
    return inputs


def as_prompts(name: str, ids: PromptsInput, attention_mask: torch.Tensor | None,
               device: torch.device | None = None) -> list[torch.Tensor]:
    """The 1-D prompts of `ids` (see the module docstring); `name` is the argument's name."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"{name}: expected a (batch, length) tensor or a list of 1-D "
                             f"prompts, found a tensor of shape {tuple(ids.shape)}")
        if attention_mask is None:
            prompts = list(ids.unbind(0))
        else:
            prompts = _unpad(name, ids, attention_mask)
    else:
        if attention_mask is not None:
            raise ValueError(f"{name}: an attention mask goes with a padded (batch, length) "
                             f"tensor, found a list of prompts (give the prompts unpadded)")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"{name}: expected a (batch, length) tensor or a list of 1-D "
                             f"prompts, found {type(ids).__name__}")
        prompts = [_as_1d(name, index, prompt, device) for index, prompt in enumerate(ids)]
    if not prompts:
        raise ValueError(f"{name}: expected at least one prompt, found none")
    for index, prompt in enumerate(prompts):
        if prompt.shape[0] == 0:
            raise ValueError(f"{name}: prompt {index} has no tokens; expected at least one")
        if prompt.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected integer token ids, found {prompt.dtype} in "
                             f"prompt {index}")
    return [p.long() for p in prompts]


def _unpad(name: str, ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    if attention_mask.shape != ids.shape:
        raise ValueError(f"attention mask of {name}: expected shape {tuple(ids.shape)}, found "
                         f"{tuple(attention_mask.shape)}")
    keep = attention_mask.to(device=ids.device, dtype=torch.bool)
    return [row[mask] for row, mask in zip(ids.unbind(0), keep.unbind(0))]


def _as_1d(name: str, index: int, prompt: Any, device: torch.device | None) -> torch.Tensor:
    if not isinstance(prompt, torch.Tensor):
        try:
            prompt = torch.tensor(list(prompt), dtype=torch.long, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}: prompt {index}: expected a 1-D tensor or a list of ints, "
                             f"found {type(prompt).__name__}") from None
    if prompt.dim() != 1:
        raise ValueError(f"{name}: prompt {index}: expected a 1-D tensor, found shape "
                         f"{tuple(prompt.shape)}")
    return prompt


def check_ids(name: str, prompts: Sequence[torch.Tensor], vocab_size: int | None) -> None:
    """ValueError naming the first id outside [0, vocab_size) (one host sync for all)."""
    if vocab_size is None:
        return
    flat = torch.cat([p.reshape(-1) for p in prompts])
    bad = (flat < 0) | (flat >= vocab_size)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    for index, prompt in enumerate(prompts):
        if first < prompt.shape[0]:
            raise ValueError(f"{name}: prompt {index} has token id {int(prompt[first])} at "
                             f"position {first}; expected ids in [0, {vocab_size}) (the model's "
                             f"vocab_size)")
        first -= prompt.shape[0]


def check_lengths(name: str, lengths: Sequence[int], max_positions: int | None,
                  new_tokens: int = 0) -> None:
    """ValueError if a sequence of `lengths[i]` tokens plus `new_tokens` generated ones would
    feed the model a position past its `max_positions` (the last token generated is not fed)."""
    if max_positions is None:
        return
    for index, length in enumerate(lengths):
        needed = length + max(new_tokens - 1, 0)
        if needed > max_positions:
            also = f" plus max_new_tokens={new_tokens}" if new_tokens else ""
            raise ValueError(f"{name}: prompt {index} has {length} tokens{also}, which needs "
                             f"{needed} positions; the model has {max_positions} "
                             f"(max_position_embeddings)")


def check_max_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, found {max_new_tokens!r}")
    return max_new_tokens


def stop_tokens(config: Any, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
                ignore_eos: bool) -> tuple[tuple[int, ...] | None, int]:
    """(EOS ids, or None when nothing stops a sequence; the id that fills finished rows).

    None arguments take the model config's values, as Hugging Face does; with an EOS id and no
    pad id, finished rows are filled with the first EOS id (warned once, as Hugging Face warns).
    """
    if ignore_eos:
        return None, 0 if pad_token_id is None else pad_token_id
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if eos is None:
        return None, 0 if pad is None else pad
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos)
    if not eos_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
        raise ValueError(f"eos_token_id: expected an int or a non-empty sequence of ints, "
                         f"found {eos!r}")
    if pad is None:
        _warn_pad_is_eos(eos_ids[0])
        pad = eos_ids[0]
    return eos_ids, pad


@functools.cache
def _warn_pad_is_eos(eos_id: int) -> None:
    logger.warning("generate: no pad_token_id given or in the model config; finished "
                   "sequences are padded with eos_token_id %d, as Hugging Face does "
                   "(warned once)", eos_id)
