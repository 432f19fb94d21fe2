"""map_by_item: layers side by side, one torch thread each, answers in order."""

from __future__ import annotations

import threading

import pytest
import torch

from mpdeploy.sparsity.threads import map_by_item


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def work(seed: int) -> tuple[float, int, str]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 64, generator=g)
    return float((a @ a.T).sum()), torch.get_num_threads(), threading.current_thread().name


def test_items_run_side_by_side_on_one_thread_each_and_answer_in_order(two_threads):
    items = list(range(7))
    calls = []
    both = threading.Barrier(2, timeout=60)

    def item(i: int):
        if i >= 5:  # the two costliest start first, one per worker: each waits until the other runs
            both.wait()
        return work(i)

    got = map_by_item(item, items, cost=lambda i: i, done=lambda n, total: calls.append((n, total,
                                                                                          threading.current_thread().name)))
    assert [g[0] for g in got] == [work(i)[0] for i in items]  # the same numbers, in the items' order
    assert {g[1] for g in got} == {1}  # one torch thread inside every item
    assert got[5][2] != got[6][2]  # the two that met at the barrier ran on two threads at once
    assert [(n, total) for n, total, _ in calls] == [(n, 7) for n in range(1, 8)]
    assert {name for _, _, name in calls} == {threading.current_thread().name}  # reported where it was called
    assert torch.get_num_threads() == 2  # restored


def test_the_first_failure_is_raised_and_threads_restored(two_threads):
    def fail_on_three(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        map_by_item(fail_on_three, list(range(6)))
    assert torch.get_num_threads() == 2


def test_one_thread_is_a_plain_loop():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = map_by_item(lambda i: threading.current_thread().name, [0, 1, 2])
        assert names == [threading.current_thread().name] * 3
    finally:
        torch.set_num_threads(before)
