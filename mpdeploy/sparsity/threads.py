"""Thread control for code made of many small tensor ops, and for work split by layer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


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


def map_by_item(fn: Callable[[T], R], items: Sequence[T], *, cost: Callable[[T], float] | None = None,
                done: Callable[[int, int], None] | None = None) -> list[R]:
    """[fn(item) for item in items], the items side by side on as many Python threads as torch has
    intra-op threads, each thread running torch on one intra-op thread.

    For independent items (the layers of the mask selection): whole items in parallel instead of each
    op split over OpenMP threads, so no op waits on (or spin-waits for) a second thread, and loops of
    small ops run side by side (torch releases the GIL inside its ops). Every result is what one thread
    computes, whatever the scheduling. `cost` starts the largest items first, so the last one does not
    run alone; `done(finished, total)` is called in the calling thread as items finish. The first
    exception is raised, and items not yet started are dropped."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        results = []
        for i, item in enumerate(items):
            results.append(fn(item))
            if done:
                done(i + 1, len(items))
        return results
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))
    results: list = [None] * len(items)

    def run(i: int) -> None:
        torch.set_num_threads(1)  # per thread: a new thread starts at the process default
        results[i] = fn(items[i])

    with single_thread():
        pool = ThreadPoolExecutor(workers, thread_name_prefix="mpdeploy-layer")
        try:
            pending = {pool.submit(run, i) for i in order}
            finished = 0
            while pending:
                complete, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in complete:
                    future.result()  # re-raises the item's exception
                    finished += 1
                    if done:
                        done(finished, len(items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return results
