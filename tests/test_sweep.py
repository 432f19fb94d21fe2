"""`mpdeploy sweep` on a real local Ray: rows, choice, artifact, resume, a failing trial, a killed worker, a
killed driver, an Optuna-searched space, and the store probe refusing a node that cannot see the store.

One Ray for the module (2 CPUs, no dashboard); extra nodes join it or a head of their own as `ray start
--block` processes in their own process group, stopped by that group only (never `ray stop`, which would
stop every Ray on the machine). The default set keeps one sweep through Ray Tune (the 4-trial sweep, its
failing rows, ship and resume) and the store probe (no trials): each sweep costs tens of CPU seconds (a
Tune run starts a worker per concurrent trial, each importing torch and the stages), so the killed worker,
the killed driver, the Optuna search, --promote and the two-node cluster (`ray start --head` plus a node
with a resource standing for a GPU kind) are marked slow (`make test-slow`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
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


@pytest.fixture(scope="module", autouse=True)
def _ray_auth_disabled():
    """Every Ray here (the local one, `ray start` nodes, the sweep's driver) runs with token authentication
    off, said explicitly: with RAY_AUTH_MODE unset Ray 2.60 turns it on for `ray.init()` by default and for
    `ray start` where ~/.ray/auth_token exists, and a driver that attaches to a cluster it did not start
    then fails to connect (the two-node test, run on its own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        yield


@pytest.fixture(scope="module")
def _module_ray():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_module_ray):
    """The module's local Ray (started once; again if a cluster test shut it down)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)


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


def _row(rid, p50, top1, drop, status="ok", dense=10.0, ci=None):
    ci = ci or [0.95 * dense / p50, 1.05 * dense / p50]
    return {"id": rid, "config": {"x": rid}, "phase": "full", "status": status, "precision": "fp32",
            "top1_sparse": top1, "top1_dense": top1 + drop, "top1_drop": drop, "agreement": 1 - drop,
            "labels_meaningful": True, "latency": {"8": {"sparse": {"p50": p50}, "dense": {"p50": dense},
                                                         "speedup_ci95": ci}}}


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


def test_a_sparse_trial_not_measurably_faster_than_its_twin_is_never_the_choice():
    """The fastest trial within budget whose speedup interval holds 1.0 loses to one measurably faster, and
    when none is, the choice stays dense (sparsity only where it pays)."""
    objective = Objective("p50", 8)
    noisy = _row("noisy", 6.0, 0.94, 0.0, ci=[0.8, 1.6])  # fastest, but its own twin may be as fast
    sure = _row("sure", 7.0, 0.94, 0.0, ci=[1.2, 1.6])
    rows = [noisy, sure, *choosing.baseline_rows([noisy, sure], objective)]
    assert choosing.choose(rows, objective, 0.02) == {"cpu": "sure"}
    assert "not measurably faster than its dense twin at batch 8 (95% interval [0.800, 1.600]" in noisy["verdict"]
    untimed = {**_row("untimed", 5.0, 0.94, 0.0), "latency": {"8": {"sparse": {"p50": 5.0}, "dense": {"p50": 10.0}}}}
    rows = [noisy, untimed, *choosing.baseline_rows([noisy, untimed], objective)]
    assert choosing.choose(rows, objective, 0.02) == {"cpu": "dense-cpu"}
    assert "no interval" in untimed["verdict"]


def test_promote_ranks_within_budget_by_sparse_mac_cut():
    rows = [{"id": "lo", "status": "ok", "top1_drop": 0.0, "sparse_execution_mac_cut": 0.2},
            {"id": "hi", "status": "ok", "top1_drop": 0.01, "sparse_execution_mac_cut": 0.45},
            {"id": "over", "status": "ok", "top1_drop": 0.2, "sparse_execution_mac_cut": 0.5},
            {"id": "bad", "status": "failed"}]
    promoted, why = choosing.promote(rows, 2, max_drop=0.02)
    assert promoted == ["hi", "lo"] and list(why) == ["over"] and "rank 3 of 3" in why["over"]


def test_a_config_sampled_twice_is_one_row_that_counts_its_runs():
    from mpdeploy.pipeline.sweep.tune_run import distinct_rows

    rows = [{"id": "a", "kind": None, "status": "failed", "reason": "worker died"}, {"id": "b", "kind": None, "status": "ok"},
            {"id": "a", "kind": None, "status": "ok"}, {"id": "a", "kind": "H200", "status": "ok"}]
    assert distinct_rows(rows) == [{"id": "a", "kind": None, "status": "ok", "tune_trials": 2},
                                   {"id": "b", "kind": None, "status": "ok", "tune_trials": 1},
                                   {"id": "a", "kind": "H200", "status": "ok", "tune_trials": 1}]


def test_optuna_is_told_a_failed_trial_failed(caplog):
    """A failed trial reports no numbers: Optuna records it FAIL (plain OptunaSearch would hand it None values,
    which it refuses with a warning and leaves the trial RUNNING)."""
    from mpdeploy.pipeline.sweep.tune_run import optuna_search

    param_space, searcher = optuna_search({"saliency": ["magnitude", "wanda"]}, {}, Objective("p50", 8), "full", 0)
    searcher.set_search_properties(None, None, param_space)
    searcher.suggest("failed")
    searcher.suggest("finished")
    searcher.on_trial_complete("failed", {"objective": None, "top1_drop": None})
    searcher.on_trial_complete("finished", {"objective": 1.5, "top1_drop": 0.01})
    study = searcher._ot_study  # Ray's OptunaSearch keeps its study here
    assert [(t.state.name, t.values) for t in study.trials] == [("FAIL", None), ("COMPLETE", [1.5, 0.01])]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bad_flags_are_one_line_before_ray(tmp_path, capsys):
    code = cli_main(["sweep", "zoo:digits_vit", "--out", str(tmp_path / "s"), "--objective", "p50@b4",
                     "--grid", "saliency=magnitude"])
    err = capsys.readouterr().err
    assert code == 2 and "not in --batch-sizes" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert cli_main(["sweep", "--out", str(tmp_path / "mine"), "--grid", "saliency=magnitude"]) == 2
    assert "did not write" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert cli_main(["sweep", "--out", str(tmp_path / "s"), "--samples", "3", "--grid", "saliency=magnitude"]) == 2
    assert "add --search optuna" in capsys.readouterr().err


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
        result = AuditFolder.open(out / r["folders"]["audit"]).result()
        summary = result["summary"]
        assert (r["top1_sparse"], r["top1_dense"], r["agreement"]) == (
            summary["top1_sparse"], summary["top1_dense"], summary["agreement"])
        assert r["latency"]["8"]["speedup"] == summary["speedup_p50"]["8"]
        assert r["manifests"]["audit"] == artifacts.manifest_hash(out / r["folders"]["audit"])
        assert r["node"]["engine_steps"]["node_id"] == ray.get_runtime_context().get_node_id()
        assert result["device"]["host"]["placement"] == r["node"]["engine_steps"]  # the audit says where it ran
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


@pytest.mark.slow
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
def test_killed_driver_then_the_same_command_reuses_every_finished_step(local_ray, tmp_path):
    """SIGKILL a sweep's driver (and its Ray) once its first trial is audited; the same command again reuses that
    trial's steps untouched (nothing recomputed), finishes the other trial and writes the sweep."""
    out = tmp_path / "sw"
    args = ["sweep", "zoo:digits_vit", "--out", str(out), *FAST, "--concurrent", "1", "--num-cpus", "2",
            "--grid", "saliency=magnitude,wanda"]
    log = tmp_path / "driver.log"
    with open(log, "w") as f:  # its own session: the driver, its local Ray and the trial workers in one group
        driver = subprocess.Popen([sys.executable, "-m", "mpdeploy", *args], stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for("a first audited trial", lambda: any((out / "steps").glob("engine-*/audit/audit.json")), driver, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (out / "sweep").exists()  # stopped before the end: no sweep artifact yet
    (audit,) = [p.parent for p in (out / "steps").glob("engine-*/audit/audit.json")]
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "steps" in p.parts
                and not any(part.startswith(".") for part in p.relative_to(out).parts)}
    assert cli_main(args) == 0
    rows = [r for r in _record(out)["rows"] if not r.get("baseline")]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    (first,) = [r for r in rows if (out / r["folders"]["audit"]).resolve() == audit.resolve()]
    assert {s["status"] for s in first["steps"].values()} == {"reused"}
    other = next(r for r in rows if r is not first)
    assert other["steps"]["audit"]["status"] == "built"
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # nothing that had finished was rewritten


def _optuna_samples(grid: dict[str, list[str]], seed: int, n: int) -> list[str]:
    """The trial ids a fresh OptunaSearch set up as the sweep sets it up suggests first (its random start-up)."""
    from mpdeploy.pipeline.sweep.space import trial_id
    from mpdeploy.pipeline.sweep.tune_run import optuna_search

    param_space, searcher = optuna_search(grid, {}, Objective("p50", 8), "full", seed)
    searcher.set_search_properties(None, None, param_space)
    return [trial_id(searcher.suggest(f"predict-{i}")) for i in range(n)]


@pytest.mark.slow
def test_optuna_search_runs_n_seeded_trials_within_the_space(local_ray, tmp_path):
    """--search optuna: exactly N Tune trials, each config a point of the space, the seed's samples (Optuna's
    seeded random start-up: the same configs every run), one row per distinct config, the choice within budget.
    With optuna 5, seed 2 samples magnitude/0.3 twice and magnitude/BAD_TARGET once (a failing row)."""
    out, samples, seed = tmp_path / "sw", 3, 2
    grid = {"saliency": ["magnitude", "wanda"], "target-mac-reduction": ["0.3", BAD_TARGET]}
    assert _sweep(out, *(f"{k}={','.join(v)}" for k, v in grid.items()),
                  extra=["--search", "optuna", "--samples", str(samples), "--search-seed", str(seed)]) == 0
    record = _record(out)
    assert record["search"] == "optuna" and record["optuna"] == {"samples": samples, "seed": seed}
    trials = [r for r in record["rows"] if not r.get("baseline")]
    assert sum(r["tune_trials"] for r in trials) == samples  # exactly N trials ran
    assert len({r["id"] for r in trials}) == len(trials)  # a config sampled twice is one row
    assert {r["id"]: r["tune_trials"] for r in trials} == Counter(_optuna_samples(grid, seed, samples))
    for r in trials:
        assert r["config"].keys() == grid.keys() and all(r["config"][k] in grid[k] for k in grid)
        if r["config"]["target-mac-reduction"] == BAD_TARGET:
            assert r["status"] == "failed" and "--target-mac-reduction 0.950 is more than" in r["reason"]
        else:
            assert r["status"] == "ok" and r["steps"]["audit"]["status"] in ("built", "reused")
    chosen = next(r for r in record["rows"] if r["id"] == record["choice"]["cpu"])
    assert chosen["status"] == "ok" and chosen["top1_drop"] <= record["max_top1_drop"]


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
# more Ray nodes on this machine: `ray start --block` in a process group of its own, stopped by that group

NODE_WAIT_S = 240.0  # a deadline for a node to join or leave on a loaded machine (a failure, not a timing)


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _alive() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def _wait_for(what: str, done, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + NODE_WAIT_S
    while not done():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: `ray start` exited {proc.returncode}: {log.read_text()[-2000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {NODE_WAIT_S:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _ray_node(log: Path, address: str, *flags: str, hide: Path | None = None):
    """`ray start --block FLAGS` (its raylet and workers in its process group), a head at `address` (flags hold
    --head) or a node joining the cluster there; with `hide`, in a mount namespace of its own where an empty tmpfs
    covers that folder: a node that sees another filesystem at the store's path. It inherits this process's
    environment, so its Ray authentication (RAY_AUTH_MODE: disabled in this module) is the driver's."""
    head = "--head" in flags
    cmd = [_ray_bin(), "start", "--block", "--disable-usage-stats",
           f"--port={address.rsplit(':', 1)[1]}" if head else f"--address={address}", *flags]
    if hide is not None:
        cmd = ["unshare", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs mpdeploy-test "$0" && exec "$@"',
               str(hide), *cmd]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # ray start --block drains its node and stops what it started
        try:
            proc.wait(timeout=NODE_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that group still running
        _forget_address(address)


def _forget_address(address: str) -> None:
    """`ray start` wrote `address` as this machine's latest cluster (what a bare ray.init() would join): remove it
    once that cluster is gone, as `ray stop` would, unless another `ray start` wrote its own since."""
    from ray._private.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip().rsplit(":", 1)[-1] == address.rsplit(":", 1)[-1]:  # the same port: ours
            path.unlink()


def test_store_probe_refuses_a_node_that_cannot_see_the_store(local_ray, tmp_path, capsys):
    """A second node whose --out path is another (empty) filesystem: one line naming that node, exit 2, no work."""
    out = tmp_path / "sw"
    out.mkdir()
    before = len(_alive())
    log = tmp_path / "node.log"
    with _ray_node(log, ray.get_runtime_context().gcs_address, "--num-cpus=1", hide=out) as proc:
        _wait_for("the second node joining", lambda: len(_alive()) == before + 1, proc, log)
        (hidden,) = [n for n in _alive() if n["NodeID"] != ray.get_runtime_context().get_node_id()]
        code = _sweep(out, "saliency=magnitude")
    _wait_for("the second node leaving", lambda: len(_alive()) == before)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"({hidden['NodeID'][:8]}) cannot see the artifact store {out}" in err and "FileNotFoundError" in err
    assert sorted(p.name for p in out.iterdir()) == []  # refused before any work; the probe's files removed


# ---------------------------------------------------------------------------------------------------
# two nodes on this machine: the kind-bound steps land on the node that has the kind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_cluster_engine_steps_on_the_gpu_kind_node(tmp_path):
    """`ray start --head` and a second node offering accelerator_type:H200: the sweep (attaching with
    --ray-address) builds and times the engine on the H200 node, and each row and each audit record that node."""
    from mpdeploy.core.kinds import AuditFolder

    ray.shutdown()  # the module's local Ray: this test attaches to its own cluster
    address = f"127.0.0.1:{_free_port()}"
    with contextlib.ExitStack() as nodes:
        head = nodes.enter_context(_ray_node(tmp_path / "head.log", address, "--head", "--num-cpus=1",
                                             "--include-dashboard=false"))
        _wait_for("the head starting", lambda: _connect(address), head, tmp_path / "head.log")
        kind_node = nodes.enter_context(_ray_node(tmp_path / "h200.log", address, "--num-cpus=1",
                                                  '--resources={"accelerator_type:H200": 1}'))
        _wait_for("the H200 node joining", lambda: len(_alive()) == 2, kind_node, tmp_path / "h200.log")
        h200 = [n["NodeID"] for n in _alive() if "accelerator_type:H200" in n["Resources"]]
        ray.shutdown()  # the sweep connects by itself, through --ray-address
        out = tmp_path / "sw"
        code = cli_main(["sweep", "zoo:digits_vit", "--out", str(out), *FAST, "--ray-address", address,
                         "--gpu-kinds", "H200", "--grid", "saliency=magnitude"])
    assert code == 0
    record = _record(out)
    (row,) = [r for r in record["rows"] if not r.get("baseline")]
    assert row["kind"] == "H200" and record["choice"].keys() == {"H200"} and len(h200) == 1
    # built and timed on the node of that kind: the row of that audit records the node
    assert row["node"]["engine_steps"]["node_id"] == h200[0]
    assert row["manifests"]["audit"] == artifacts.manifest_hash(out / row["folders"]["audit"])
    # the audit itself, opened verified where the row points (the manifest hash above ties it to the row)
    placement = AuditFolder.open(out / row["folders"]["audit"]).result()["device"]["host"]["placement"]
    assert placement["node_id"] == h200[0] and placement == row["node"]["engine_steps"]


def _connect(address: str) -> bool:
    """ray.init(address) once the head answers (False until then)."""
    try:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    except (ConnectionError, RuntimeError):
        return False
    return True
