"""Typed errors for users of the project's models and weight loading."""
from __future__ import annotations

from typing import Any


class UnsupportedConfigError(ValueError):
    """A Hugging Face config value that changes the math and that this project does not implement."""

    def __init__(self, key: str, found: Any, supported: Any) -> None:
        super().__init__(f"config key {key!r}: found {found!r}, which fxkiln's model does not "
                         f"implement; supported: {supported}")
        self.key = key


class WeightLoadError(ValueError):
    """A checkpoint tensor is missing, unexpected or of the wrong shape; names the tensor."""

    def __init__(self, message: str, tensor_name: str) -> None:
        super().__init__(message)
        self.tensor_name = tensor_name
