"""Triton's CPU interpreter, made to patch `triton.language` once per kernel launch, and to
skip the overflow checks whose result it throws away.

The interpreter swaps `triton.language`'s builtins for its numpy versions when a kernel is
launched (`GridExecutor.__call__`, restored when the launch ends), and again at every call of a
`@triton.jit` helper from inside the kernel (`InterpretedFunction.__call__`, never restored):
a helper called in a loop repeats `inspect.getmembers` over the language modules each time,
about a quarter of an interpreted decode-attention step (triton 3.6). Inside a launch that
patched the modules a helper sees, the helper's call skips the repeat: it would set the same
functions again. Anything else (a helper whose globals reach a language module the kernel's do
not, a call outside a launch, another interpreter layout) patches as Triton does.

The interpreter's options sanitize integer overflow with debug off: every 32-bit add, sub and
mul is redone in 64 bits and compared with the type's range, and the `device_assert` that would
read the comparison returns at once without debug (`semantic.device_assert`), so the work is
never seen; it was about a third of an interpreted decode-attention step (triton 3.6).
Compiled for the GPU, the same kernels do not check either (debug is off there too).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def patch_once_per_launch() -> bool:
    """Install the once-per-launch patching; False (nothing changed) where Triton's
    interpreter does not have the functions this relies on."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch is None or scope_type is None or executor is None \
            or getattr(patch, "once_per_launch", False):
        return False
    launches: list[set[int]] = []  # per launch in progress: the language modules it patched
    launch = executor.__call__

    def languages(fn: Callable[..., Any]) -> set[int]:  # the modules _patch_lang patches
        return {id(value) for value in fn.__globals__.values()
                if inspect.ismodule(value) and value in (tl, tl.core)}

    def patch_lang(fn: Callable[..., Any]) -> Any:
        wanted = languages(fn)
        if launches and launches[-1] and wanted <= launches[-1]:
            return scope_type()  # patched by this launch already, restored when it ends
        scope = patch(fn)
        if launches:
            launches[-1] |= wanted
        return scope

    def launch_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_lang.once_per_launch = True  # type: ignore[attr-defined]  # marks the installed one
    interpreter._patch_lang = patch_lang
    executor.__call__ = launch_once
    logger.debug("triton's interpreter patches triton.language once per launch")
    return True


def skip_discarded_overflow_checks() -> bool:
    """Turn the interpreter's overflow sanitizing off where its checks are discarded (debug
    off); False (nothing changed) where debug is on, it is off already, or the interpreter
    keeps its options elsewhere."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or getattr(options, "debug", True) \
            or not getattr(options, "sanitize_overflow", False):
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    logger.debug("triton's interpreter: overflow sanitizing off (debug is off: never checked)")
    return True
