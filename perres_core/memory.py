"""Recognising out-of-memory failures on every device torch runs on."""
from __future__ import annotations

import torch

# CUDA and XPU raise torch.OutOfMemoryError; the CPU allocator ("DefaultCPUAllocator: can't allocate
# memory") and MPS ("MPS backend out of memory") raise plain RuntimeErrors.
_OOM_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` says an allocation failed for lack of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(phrase in str(exc).lower() for phrase in _OOM_PHRASES)
