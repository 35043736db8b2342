"""fxkiln's own models, built on parallel layers, and `from_hf` to load Hugging Face weights."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from models.base import ProjectModel
from models.errors import UnsupportedConfigError, WeightLoadError
from models.parallel import TensorParallel
from models.weights import iterate_safetensors, load_weights
from runtime.memory import weight_memory_bytes

logger = logging.getLogger(__name__)


def _model_classes() -> dict[str, type[ProjectModel]]:
    from models.bart import BartForConditionalGeneration
    from models.llama import LlamaForCausalLM

    return {"bart": BartForConditionalGeneration, "llama": LlamaForCausalLM}


def from_hf(hf_model_or_dir: Any, tp_size: int = 1, *, group: dist.ProcessGroup | None = None,
            dtype: torch.dtype | None = None, device: torch.device | str | None = None
            ) -> ProjectModel:
    """The project's model for a Hugging Face model object or a `save_pretrained` folder.

    Dispatches on the config's `model_type` ("bart", "llama"). With `tp_size > 1` this process
    builds its shard: torch.distributed must be initialized and `group` (default: the world
    group) must have `tp_size` ranks. dtype/device default to the HF model's (a folder: the
    config's dtype, else float32, on CPU). Weights come from `state_dict()` or the folder's
    `*.safetensors` files; a missing, unexpected or mis-shaped tensor raises WeightLoadError.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"from_hf: tp_size: expected an integer >= 1, found {tp_size!r}")
    if isinstance(hf_model_or_dir, (str, os.PathLike)):
        from transformers import AutoConfig

        _check_folder(Path(hf_model_or_dir))
        config = AutoConfig.from_pretrained(hf_model_or_dir, local_files_only=True)
        weights: Any = iterate_safetensors(hf_model_or_dir)
        config_dtype = getattr(config, "dtype", None)
        default_dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
        default_device = torch.device("cpu")
    else:
        config = hf_model_or_dir.config
        weights = hf_model_or_dir.state_dict().items()
        first = next(hf_model_or_dir.parameters())
        default_dtype, default_device = first.dtype, first.device
    classes = _model_classes()
    model_type = getattr(config, "model_type", None)
    if model_type not in classes:
        raise UnsupportedConfigError("model_type", model_type, sorted(classes))
    tp = _tensor_parallel(tp_size, group)
    model = classes[model_type](config, tp=tp)
    start = time.perf_counter()
    model.to(dtype=dtype or default_dtype, device=device or default_device)
    load_weights(model, weights)
    logger.info("Loading model weights took %.4f GiB (%s, %.2f s)",
                weight_memory_bytes(model) / 2**30, type(model).__name__,
                time.perf_counter() - start)
    return model.eval()


def _check_folder(folder: Path) -> None:
    """A save_pretrained folder: it exists and holds config.json (no hub look-up for typos)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"from_hf: expected a Hugging Face model object or a local "
                                f"folder saved by save_pretrained, found the path {str(folder)!r}, "
                                f"which {'is a file' if folder.exists() else 'does not exist'}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"from_hf: expected a folder saved by save_pretrained (with a "
                                f"config.json), found {str(folder)!r} without one")


def _tensor_parallel(tp_size: int, group: dist.ProcessGroup | None) -> TensorParallel:
    if tp_size == 1:
        return TensorParallel()
    tp = TensorParallel.from_group(group)
    if tp.size != tp_size:
        raise ValueError(f"tp_size={tp_size} but the process group has {tp.size} ranks")
    return tp


__all__ = ["ProjectModel", "UnsupportedConfigError", "WeightLoadError", "from_hf"]
