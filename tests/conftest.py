import os
import re

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


# ---------------------------------------------------------------------------------------------------
# Skips that cannot hide failures (issue 23): a test may skip only for what cannot exist on this machine:
# a GPU, TensorRT, a Docker daemon, or the privileges to mount (a container without CAP_SYS_ADMIN).
# A missing declared dependency (polygraphy, tritonserver from the serve extra, mpdeploy's own modules)
# or any other precondition fails the test, with the skip's reason.
ALLOWED_SKIP = re.compile(r"\b(GPU|CUDA|TensorRT|tensorrt|compute capability|Docker|docker)\b|mount", re.I)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def _fail_disallowed_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not ALLOWED_SKIP.search(reason):
            report.outcome = "failed"
            report.longrepr = (f"skipped for a reason that may not skip a test (only a GPU, TensorRT, Docker or "
                               f"mount privileges may): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())
