"""Every benchmark script runs end to end in its tiny `--smoke` mode (numbers not checked: speed goals live
in the scripts' own results, never in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
# Run by another script inside a peer's own environment, never on its own: no smoke mode of its own.
DRIVEN = {"modelopt_rows.py": "needs ModelOpt's own venv (--modelopt-python); method_table.py shows its rows"}
# Smoke runs that train or build several models: minutes on 2 cores, so under `make test-slow`.
SLOW = {"method_table.py", "restore_timing.py", "build_e2e.py", "audit_imagefolder.py"}
# Where each script writes with --out (a folder for some, a file for others).
OUT = {"digits_accuracy.py": "dir", "permutation.py": "dir"}


def test_every_script_is_listed():
    assert set(SCRIPTS) == {"digits_accuracy.py", "distill_digits.py", "permutation.py", "prune_timing.py",
                            "tome_ort_latency.py", "torch_sparse_speed.py", "int8_ort.py", "restore_timing.py",
                            "method_table.py", "modelopt_rows.py", "build_e2e.py", "audit_imagefolder.py"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s
                                    for s in SCRIPTS if s not in DRIVEN])
def test_smoke_mode_runs(script, tmp_path):
    out = tmp_path / "results" if OUT.get(script) == "dir" else tmp_path / "results" / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MPDEPLOY_ZOO_DIR": os.environ.get("MPDEPLOY_ZOO_DIR", str(REPO / "engines" / "_zoo"))}
    argv = [sys.executable, str(REPO / "benchmarks" / script), "--smoke"]
    if script != "torch_sparse_speed.py":  # its dry run prints instead of writing
        argv += ["--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if script != "torch_sparse_speed.py":
        written = sorted(out.rglob("*.json")) if out.is_dir() else [out]
        assert written and all(json.loads(p.read_text()) for p in written)
