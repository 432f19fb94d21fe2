"""Intra-op thread control for code made of many small tensor ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after). For loops of small ops (OBS
    column updates, the permutation search) on few, shared cores, waking a second OpenMP thread per op
    costs more than it brings (3-10x slower measured with 2 threads on 2 busy cores)."""
    before = torch.get_num_threads()
    if enabled and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
