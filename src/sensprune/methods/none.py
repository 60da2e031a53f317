"""Dense training: no regularizer, no pruning (the baseline every table starts from)."""

from __future__ import annotations

from .base import Method


class Dense(Method):
    name = "none"
    sparsifies = False
