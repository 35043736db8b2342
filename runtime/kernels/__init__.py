"""Kernel implementations of the dispatch ops. Importing this package registers them all."""
from __future__ import annotations

from runtime.kernels import native  # noqa: F401  (registers the native implementations)
from runtime.kernels import triton_kernels  # noqa: F401  (registers "triton" when Triton is installed)
from runtime.kernels import triton_lifted  # noqa: F401  (the ops the lifting passes write)

if triton_kernels.triton_jit is not None:
    from runtime.kernels import triton_linear  # noqa: F401  (registers linear's "triton")
    from runtime.kernels import triton_cache_attention  # noqa: F401  (cache_attention's)
    from runtime.kernels import triton_norm_linear  # noqa: F401  (and the norm + linear ops')
    from runtime.kernels import triton_argmax  # noqa: F401  (argmax's, for the greedy token)
