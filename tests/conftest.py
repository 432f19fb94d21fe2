import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside ONNX Runtime.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI; random-init timm models only


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: on 2 cores shared with other jobs (ONNX Runtime,
    Polygraphy subprocesses) two OpenMP threads spin-wait on each other, ~10-20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
