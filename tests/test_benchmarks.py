"""Every benchmark script runs end to end in its tiny `--smoke` mode and writes its provenance (numbers not
checked: speed goals live in the scripts' own results, never in tests); the provenance helper measures each
child on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402

# Not benchmarks: the shared helpers they use, and the README renderer (tests/test_readme_numbers.py).
HELPERS = {"provenance.py", "render_readme.py"}
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in HELPERS)
# Run by another script inside a peer's own environment, or a one-off maker of shipped files: no smoke mode.
DRIVEN = {"modelopt_rows.py": "needs ModelOpt's own venv (--modelopt-python); method_table.py shows its rows",
          "train_zoo.py": "trains the shipped zoo weights (minutes); tests/test_models.py checks their sha256"}
# Smoke runs that train or build several models: minutes on 2 cores, so under `make test-slow`.
SLOW = {"method_table.py", "restore_timing.py", "build_e2e.py", "audit_imagefolder.py", "demo.py",
        "sweep_vs_builds.py"}
# Where each script writes with --out (a folder for some, a file for others).
OUT = {"digits_accuracy.py": "dir", "permutation.py": "dir"}
PROVENANCE_KEYS = {"git", "date", "machine", "loadavg_before", "loadavg_after", "versions", "models"}


def test_every_script_has_a_smoke_mode_or_a_reason():
    """A new script either has a --smoke mode (run below) or says here why not."""
    assert {"demo.py", "export_checks.py", "prune_timing.py", "int8_ort.py"} <= set(SCRIPTS)
    for script in SCRIPTS:
        assert script in DRIVEN or "--smoke" in (REPO / "benchmarks" / script).read_text(), script


def test_every_script_records_provenance():
    """Each benchmark writes its results through benchmarks/provenance.py (commit, machine, load, models)."""
    for script in SCRIPTS:
        if script == "train_zoo.py":
            continue
        text = (REPO / "benchmarks" / script).read_text()
        assert "provenance.write_results(" in text, script


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s
                                    for s in SCRIPTS if s not in DRIVEN])
def test_smoke_mode_runs(script, tmp_path):
    out = tmp_path / "results" if OUT.get(script) == "dir" else tmp_path / "results" / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(REPO / "benchmarks" / script), "--smoke"]
    if script != "torch_sparse_speed.py":  # its dry run prints instead of writing
        argv += ["--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if script != "torch_sparse_speed.py":
        written = sorted(out.rglob("*.json")) if out.is_dir() else [out]
        assert written
        for path in written:
            prov = json.loads(path.read_text())["provenance"]
            assert PROVENANCE_KEYS <= set(prov), path
            assert prov["git"]["commit"] and prov["machine"]["cores"] and prov["versions"]["torch"]
            assert prov["models"], f"{path} records no model it measured"


def test_child_peak_memory_is_its_own():
    """A small child reports its own peak RSS, not the parent's nor an earlier child's (a running maximum)."""
    big = provenance.run_child([sys.executable, "-c", "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    small = provenance.run_child([sys.executable, "-c", "print('ok')"])
    assert big.returncode == 0 and small.returncode == 0 and small.stdout == "ok\n"
    assert big.peak_rss_mib > 400
    assert small.peak_rss_mib < 100  # the big child came first: a running maximum would say > 400


def test_child_exit_code_and_timeout():
    assert provenance.run_child([sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    run = provenance.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=1)
    assert run.returncode == "timeout" and run.record()["peak_rss_mib"] is None


def test_state_dict_hash_is_the_weights():
    torch = pytest.importorskip("torch")
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert provenance.state_dict_sha256(a) == provenance.state_dict_sha256(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert provenance.state_dict_sha256(a) != provenance.state_dict_sha256(b)


def test_zoo_hash_is_the_shipped_file():
    from mpdeploy.models.zoo import list_zoo_models, zoo_sha256

    for name in list_zoo_models():
        assert provenance.zoo_sha256(name)["sha256"] == zoo_sha256(name)


@pytest.mark.parametrize("changed, code", [
    ([], False),
    (["benchmarks/results/demo.json", "docs/sweep_frontier.png"], False),  # an earlier benchmark's outputs
    (["benchmarks/results/demo.json", "mpdeploy/prune/stage.py"], True),
    ([f"benchmarks/results/f{i}.json" for i in range(50)], True),  # the list was cut at 50: unknown, so code
])
def test_a_tree_dirty_only_in_benchmark_outputs_measured_its_commit(changed, code):
    assert provenance.code_changed({"commit": "c" * 40, "dirty": bool(changed), "changed_files": changed}) is code
