"""fxkiln's compiler: CompileConfig, compile_model and the torch.compile backend."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from compiler.backend import Backend, backend, fxkiln_backend
from compiler.capture import GraphBreakError
from compiler.compile import compile_model
from compiler.compiled_model import CompiledModel
from compiler.config import CompileConfig
from compiler.inputs import CompileInputError
from compiler.pass_manager import PassError, PassManager, PassVerificationError
from compiler.report import CompileReport
from runtime.settings import kernel_settings

BACKEND_NAME = "fxkiln"


@contextmanager
def use_config(config: CompileConfig) -> Iterator[None]:
    """Eager (uncompiled) dispatch ops use `config.kernels` inside the block."""
    with kernel_settings(config.kernels):
        yield


def _register_dynamo_backend() -> None:
    # When Dynamo found our entry point it registers the backend itself as it loads it;
    # registering here too would be a duplicate. Otherwise `import compiler` is enough.
    from torch._dynamo.backends import registry

    if BACKEND_NAME not in registry._BACKENDS and BACKEND_NAME not in registry._COMPILER_FNS:
        registry.register_backend(fxkiln_backend, name=BACKEND_NAME)


_register_dynamo_backend()

__all__ = [
    "Backend", "CompileConfig", "CompileInputError", "CompileReport", "CompiledModel",
    "GraphBreakError", "PassError", "PassManager", "PassVerificationError", "backend",
    "compile_model", "fxkiln_backend", "use_config",
]
