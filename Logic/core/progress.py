"""How long work reports progress and learns that the user asked to stop (inference, fine-tuning,
Slicer jobs): two callables, defined once."""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[float, str], None]  # (fraction done in 0..1, message)
CancelCheck = Callable[[], bool]  # True once the user asked to stop
