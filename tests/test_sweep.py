"""`mpdeploy sweep` on a real local Ray: rows, choice, artifact, resume, a failing trial, a killed worker.

One Ray for the module (2 CPUs, no dashboard). The slow part: --promote, and a two-node cluster started on
this machine (`ray start --head` plus a node with a resource standing for a GPU kind).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpdeploy.core import artifacts
from mpdeploy.cli import main as cli_main
from mpdeploy.core.errors import MpdeployError
from mpdeploy.pipeline.sweep import choice as choosing
from mpdeploy.pipeline.sweep.space import Objective, parse_grid, parse_objective

ray = pytest.importorskip("ray")  # a declared dependency (the sweep extra that `make setup` installs)

BAD_TARGET = "0.95"  # more MAC cut than 2:4 can give on the digits ViT: prune refuses it, at run time
FAST = ["--backend", "ort", "--max-eval-images", "64", "--no-sensitivity", "--no-plots", "--time-budget", "3",
        "--batch-sizes", "1,8", "--calib", "digits", "--calib-batches", "2", "--warmup", "1", "--repeats", "4",
        "--min-rounds", "2", "--max-top1-drop", "0.25"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def _sweep(out: Path, *grid: str, extra=()) -> int:
    return cli_main(["sweep", "zoo:digits_vit", "--out", str(out), *FAST, *extra, "--grid", *grid])


def _record(out: Path) -> dict:
    return json.loads((out / "sweep" / "sweep.json").read_text())


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# pure parts: no Ray


def test_grid_and_objective_parsing():
    assert parse_grid(["saliency=magnitude,wanda", "tome=0,4"]) == {"saliency": ["magnitude", "wanda"],
                                                                  "tome": ["0", "4"]}
    for bad, words in [("colour=red", "not one of"), ("saliency", "KEY=V1,V2"), ("tome=-1", "at least 0"),
                       ("saliency=nope", "saliency"), ("precision=fp8", "unknown precision")]:
        with pytest.raises(MpdeployError, match=words):
            parse_grid([bad])
    with pytest.raises(MpdeployError, match="twice"):
        parse_grid(["tome=0", "tome=4"])
    assert parse_objective("p99@b32") == Objective("p99", 32)
    assert parse_objective("throughput@b8").mode == "max"
    with pytest.raises(MpdeployError, match="p50@bN"):
        parse_objective("p50")


def _row(rid, p50, top1, drop, status="ok", dense=10.0):
    return {"id": rid, "config": {"x": rid}, "phase": "full", "status": status, "precision": "fp32",
            "top1_sparse": top1, "top1_dense": top1 + drop, "top1_drop": drop, "agreement": 1 - drop,
            "labels_meaningful": True, "latency": {"8": {"sparse": {"p50": p50}, "dense": {"p50": dense}}}}


def test_choice_front_and_reasons_on_known_rows():
    objective = Objective("p50", 8)
    rows = [_row("a", 5.0, 0.90, 0.05), _row("b", 7.0, 0.94, 0.01), _row("c", 8.0, 0.93, 0.02),
            {**_row("d", 1.0, 0.5, 0.45), "status": "failed", "reason": "boom"}]
    rows += choosing.baseline_rows(rows, objective)
    assert [r["id"] for r in rows][-1] == "dense-cpu" and rows[-1]["latency"]["8"]["dense"]["p50"] == 10.0
    choice = choosing.choose(rows, objective, max_drop=0.02)
    assert choice == {"cpu": "b"}  # a is faster but over the budget; c is slower
    verdicts = {r["id"]: r["verdict"] for r in rows}
    assert verdicts["a"].startswith("over the accuracy budget") and verdicts["d"] == "failed: boom"
    assert verdicts["c"].startswith("slower: p50@b8 8 ms against 7 ms (b)") and verdicts["b"].startswith("chosen")
    # dense 0.95 at 10 ms; b (0.94, 7 ms) and a (0.90, 5 ms) are not beaten on both axes; c is (by b)
    assert sorted(choosing.pareto_front(rows, objective)) == ["a", "b", "dense-cpu"]
    # nothing within the budget but the dense baseline: stay dense
    assert choosing.choose([r for r in rows if r["id"] not in "bc"], objective, 0.02) == {"cpu": "dense-cpu"}


def test_promote_ranks_within_budget_by_sparse_mac_cut():
    rows = [{"id": "lo", "status": "ok", "top1_drop": 0.0, "sparse_execution_mac_cut": 0.2},
            {"id": "hi", "status": "ok", "top1_drop": 0.01, "sparse_execution_mac_cut": 0.45},
            {"id": "over", "status": "ok", "top1_drop": 0.2, "sparse_execution_mac_cut": 0.5},
            {"id": "bad", "status": "failed"}]
    promoted, why = choosing.promote(rows, 2, max_drop=0.02)
    assert promoted == ["hi", "lo"] and list(why) == ["over"] and "rank 3 of 3" in why["over"]


def test_bad_flags_are_one_line_before_ray(tmp_path, capsys):
    code = cli_main(["sweep", "zoo:digits_vit", "--out", str(tmp_path / "s"), "--objective", "p50@b4",
                     "--grid", "saliency=magnitude"])
    err = capsys.readouterr().err
    assert code == 2 and "not in --batch-sizes" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli_main(["sweep", "--out", str(tmp_path / "mine"), "--grid", "saliency=magnitude"]) == 2
    assert "did not write" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------
# a real local Ray


def test_sweep_rows_choice_artifact_then_resume_recomputes_nothing(local_ray, tmp_path):
    from mpdeploy.core.kinds import AuditFolder
    from mpdeploy.pipeline.sweep.report import chosen_audit, open_sweep

    out = tmp_path / "sw"
    grid = ("saliency=magnitude,wanda", f"target-mac-reduction=0.3,{BAD_TARGET}")
    assert _sweep(out, *grid) == 0
    record = _record(out)
    trials = [r for r in record["rows"] if not r.get("baseline")]
    assert len(trials) == 4 and [r["id"] for r in record["rows"] if r.get("baseline")] == ["dense-cpu"]
    failed = [r for r in trials if r["status"] == "failed"]
    assert sorted(r["config"]["target-mac-reduction"] for r in failed) == [BAD_TARGET, BAD_TARGET]
    assert all("--target-mac-reduction 0.950 is more than" in r["reason"] for r in failed)
    assert all(r["verdict"].startswith("failed: --target-mac-reduction") for r in failed)
    ok = [r for r in trials if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:  # every number is the verified audit's
        summary = AuditFolder.open(out / r["folders"]["audit"]).result()["summary"]
        assert (r["top1_sparse"], r["top1_dense"], r["agreement"]) == (
            summary["top1_sparse"], summary["top1_dense"], summary["agreement"])
        assert r["latency"]["8"]["speedup"] == summary["speedup_p50"]["8"]
        assert r["manifests"]["audit"] == artifacts.manifest_hash(out / r["folders"]["audit"])
        assert r["node"]["engine_steps"]["node_id"] == ray.get_runtime_context().get_node_id()
        assert 0.2 < r["mac_cut"] < 0.5 and r["backend"] == "ort" and r["precision"] == "fp32"
    chosen = record["choice"]["cpu"]
    assert chosen in {r["id"] for r in ok} | {"dense-cpu"}
    assert sum(r["verdict"].startswith("chosen") for r in record["rows"]) == 1
    assert all(r["verdict"] for r in record["rows"])
    assert (out / "sweep" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| trial |" in (out / "sweep" / "sweep.md").read_text()
    assert open_sweep(out / "sweep")["choice"] == record["choice"]
    if chosen != "dense-cpu":
        assert chosen_audit(out / "sweep") == (out / next(r for r in ok if r["id"] == chosen)["folders"]["audit"]).resolve()
    # `mpdeploy ship SWEEP_DIR` ships the verified choice, or refuses in one line when the choice is dense
    from mpdeploy import cli

    code = cli.main(["ship", str(out / "sweep"), "--repo", str(tmp_path / "repo"), "--name", "swept"])
    if chosen == "dense-cpu":
        assert code == 2 and not (tmp_path / "repo" / "swept").exists()
    else:
        assert code == 0 and (tmp_path / "repo" / "swept" / "1" / "SHA256SUMS").is_file()

    steps_before, manifests = _mtimes(out / "steps"), {r["id"]: r["manifests"] for r in ok}
    assert _sweep(out, *grid) == 0  # the same arguments again: every finished step verifies and is reused
    again = _record(out)
    assert _mtimes(out / "steps") == steps_before
    for r in again["rows"]:
        if r["status"] == "ok" and not r.get("baseline"):
            assert {s["status"] for s in r["steps"].values()} == {"reused"} and r["manifests"] == manifests[r["id"]]
    assert sorted(r["id"] for r in again["rows"] if r["status"] == "failed") == sorted(r["id"] for r in failed)

    # a changed artifact is refused by the sweep's own verification (ship would get a one-line error)
    audit_json = out / next(r for r in ok)["folders"]["audit"] / "audit.json"
    audit_json.write_text(audit_json.read_text().replace('"passed": true', '"passed": false'))
    with pytest.raises(MpdeployError, match="does not match the hash"):
        open_sweep(out / "sweep")


def test_killed_worker_is_retried_and_the_sweep_completes(local_ray, tmp_path):
    """SIGKILL the Ray worker of the only trial while it writes its first artifact: Tune runs it again."""
    from mpdeploy.pipeline.sweep.pipeline import run_sweep
    from mpdeploy.commands.sweep import sweep_configs_from_args
    from mpdeploy.cli import build_parser

    out = tmp_path / "sw"
    args = build_parser(only="sweep").parse_args(["sweep", "zoo:digits_vit", "--out", str(out), *FAST,
                                                  "--grid", "saliency=magnitude"])
    plan, request = sweep_configs_from_args(args)
    killed: list[int] = []
    stop = threading.Event()
    temp = re.compile(r"^\.(pruned|onnx|engine-ort|audit)\.tmp-(\d+)-")

    def killer() -> None:  # the first temporary folder names the pid of the worker writing it
        while not stop.is_set() and not killed:
            for path in (out / "steps").glob("*/.*.tmp-*") if (out / "steps").is_dir() else []:
                match = temp.match(path.name)
                if match and int(match.group(2)) != os.getpid():
                    os.kill(int(match.group(2)), signal.SIGKILL)
                    killed.append(int(match.group(2)))
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    try:
        result = run_sweep(plan, request)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no trial temporary appeared to kill"
    (row,) = [r for r in result.rows if not r.get("baseline")]
    assert row["status"] == "ok" and row["node"]["cpu_steps"]["pid"] != killed[0]
    assert not list((out / "steps").glob("*/.*.tmp-*"))  # the retry removed the killed worker's temporary
    errors = list((out / "tune").rglob("error.txt")) + list((out / "tune").rglob("error.pkl"))
    assert errors, "Tune recorded no failed attempt"


@pytest.mark.slow
def test_promote_screens_all_and_builds_the_best_k(local_ray, tmp_path):
    out = tmp_path / "sw"
    assert _sweep(out, "saliency=magnitude,wanda", "target-mac-reduction=0.3,0.45", extra=["--promote", "1"]) == 0
    record = _record(out)
    trials = [r for r in record["rows"] if not r.get("baseline")]
    full = [r for r in trials if r["phase"] == "full"]
    assert len(trials) == 4 and len(full) == 1
    assert sum(r["status"] == "not promoted" for r in trials) == 3
    assert full[0]["config"]["target-mac-reduction"] == "0.45"  # the larger cut within the budget goes first
    assert full[0]["steps"]["prune"]["status"] == "reused"  # the screen's prune feeds the engine chain
    assert len(list((out / "steps").glob("engine-*"))) == 1 and len(list((out / "steps").glob("screen-*"))) == 4


# ---------------------------------------------------------------------------------------------------
# two nodes on this machine: the kind-bound steps land on the node that has the kind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_cluster_engine_steps_on_the_gpu_kind_node(tmp_path):
    ray.shutdown()  # the module's local Ray: this test attaches to its own cluster
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                        "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        '--resources={"accelerator_type:H200": 1}', "--disable-usage-stats"], check=True, env=env,
                       capture_output=True, timeout=180)
        out = tmp_path / "sw"
        code = cli_main(["sweep", "zoo:digits_vit", "--out", str(out), *FAST, "--ray-address", f"127.0.0.1:{port}",
                         "--gpu-kinds", "H200", "--grid", "saliency=magnitude"])
        assert code == 0
        record = _record(out)
        (row,) = [r for r in record["rows"] if not r.get("baseline")]
        assert row["kind"] == "H200" and record["choice"].keys() == {"H200"}
        ray.init(address=f"127.0.0.1:{port}")
        h200 = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "accelerator_type:H200" in n["Resources"]]
        assert row["node"]["engine_steps"]["node_id"] == h200[0]
    finally:
        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
