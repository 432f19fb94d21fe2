"""One trial: an ordinary chain of artifacts made by the stages, returned as a row of plain numbers.

`run_trial(values, plan, "screen")` prunes (and distills) and measures the pruned weights' accuracy in
PyTorch (the cheap first look of --promote); `"full"` runs prune -> distill -> export -> engine -> audit.
Every step goes through the stage's own reuse rule in its store folder (store.py), under a file lock, so
trials that share a step share its artifact and a re-run recomputes nothing that verifies. With a GPU kind,
the engine and the audit run as a Ray task that asks for `accelerator_type:<KIND>` (the trial's second
placement-group bundle): an engine is built and timed on the GPU kind it is for, and its audit records the
node (the audit's placement).

A trial that fails for a reason the user can act on (a config the model cannot take, out of memory) is a
row with that reason; anything else propagates, so Ray Tune retries the trial (a killed worker).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mpdeploy.core import artifacts
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import EngineFolder, ScreenFolder
from mpdeploy.core.names import engine_folder_name
from mpdeploy.pipeline.sweep.space import Objective, TrialConfigs, describe, trial_configs, trial_id
from mpdeploy.pipeline.sweep.store import Store

logger = logging.getLogger(__name__)

KIND_KEY = "gpu-kind"  # the pseudo grid key of the GPU kind a trial's engine is built and timed on
SCREEN_KIND = "screen"
ROW_SCHEMA = "mpdeploy.sweep_row/1"


@dataclass(frozen=True)
class SweepPlan:
    """Everything a trial needs besides its values (pickled to the workers once, by tune.with_parameters)."""

    spec: Any  # mpdeploy.models.load.ModelSpec (paths absolute: workers may run elsewhere)
    prune: Any  # PruneConfig (the base flags)
    distill: Any | None  # DistillConfig template, or None
    export: Any  # ExportConfig
    build: Any  # BuildConfig (threads: the trial's share of the cores)
    audit: Any  # AuditConfig (backend set)
    backend: str
    backend_reason: str
    store: Store
    objective: Objective
    threads: int = 1


def node_info() -> dict[str, Any]:
    """Which machine ran this: the Ray node id and IP when inside Ray, the host name always."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
            info["ip"] = ray.util.get_node_ip_address()
    except ImportError:
        pass
    return info


def _limit_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_trial(values: dict[str, str], plan: SweepPlan, phase: str) -> dict[str, Any]:
    """The row of one trial ("screen" or "full"); failures the user can act on become the row's reason."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"schema": ROW_SCHEMA, "id": trial_id(values), "config": dict(values), "phase": phase,
                           "backend": plan.backend, "kind": values.get(KIND_KEY), "steps": {}, "manifests": {},
                           "folders": {}, "node": {"cpu_steps": node_info()}}
    _limit_threads(plan.threads)
    try:
        configs = trial_configs({k: v for k, v in values.items() if k != KIND_KEY}, plan.prune, plan.distill,
                                plan.export, plan.build, plan.backend)
        row["precision"] = configs.export.precision if configs.export.precision != "fp32" else (
            configs.build.precision or "fp32")
        weights_key, weights = _weights(plan, configs, row)
        if phase == "screen":
            _screen(plan, weights_key, weights, row)
        else:
            _engine_chain(plan, configs, weights_key, weights, values.get(KIND_KEY), row)
        row["status"], row["reason"] = "ok", None
    except MpdeployError as exc:
        row["status"], row["reason"] = "failed", str(exc)
    except MemoryError:
        row["status"], row["reason"] = "failed", "out of memory"
    except RuntimeError as exc:  # torch reports an allocation failure as a RuntimeError
        if "out of memory" not in str(exc).lower():
            raise
        row["status"], row["reason"] = "failed", f"out of memory ({str(exc).splitlines()[0][:160]})"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    if row["status"] == "failed":
        logger.info("trial %s (%s) failed: %s", row["id"], describe(values), row["reason"])
    return row


def _record(row: dict[str, Any], store: Store, name: str, result) -> None:
    row["steps"][name] = {"status": result.status, "seconds": round(result.seconds, 3)}
    row["folders"][name] = store.relative(result.path)
    row["manifests"][name] = artifacts.manifest_hash(result.path)


def _load(spec, seed: int):
    import torch

    from mpdeploy.models.load import load_model

    torch.manual_seed(seed)  # as mpdeploy build: random-init weights are the same on every run
    loaded = load_model(spec)
    if loaded.source.get("weights") == "random":
        loaded.source["init_seed"] = seed
    return loaded


def _weights(plan: SweepPlan, configs: TrialConfigs, row: dict[str, Any]) -> tuple[str, Path]:
    """prune [-> distill]; returns (step key, folder) of the weights the rest of the chain reads."""
    from mpdeploy.pipeline.build import model_fingerprint
    from mpdeploy.distill.run import distill_stage
    from mpdeploy.prune.run import prune_stage

    loaded = _load(plan.spec, configs.prune.seed)
    model_hash = model_fingerprint(loaded)
    key, step = plan.store.step("prune", model_hash, configs.prune)
    with plan.store.lock(step):
        result = prune_stage(loaded, model_hash, configs.prune, step / "pruned", False, None)
    del loaded
    _record(row, plan.store, "prune", result)
    row["mac_cut"] = result.details.get("mac_reduction")
    row["sparse_execution_mac_cut"] = result.details.get("sparse_execution_mac_reduction")
    weights = step / "pruned"
    if configs.distill is not None:
        from mpdeploy.distill.config import reuse_config

        key, step = plan.store.step("distill", key, reuse_config(configs.distill))
        with plan.store.lock(step):
            result = distill_stage(configs.distill, weights, step / "distilled", False, None)
        _record(row, plan.store, "distill", result)
        weights = step / "distilled"
    return key, weights


# ---------------------------------------------------------------------------------------------------
# the screen: the pruned weights' accuracy in PyTorch (seconds), an artifact of its own so a re-run reuses it


def _screen(plan: SweepPlan, weights_key: str, weights: Path, row: dict[str, Any]) -> None:
    from mpdeploy.core.runner import run_stage

    config = {"data": plan.audit.data, "max_images": plan.audit.max_eval_images, "seed": plan.audit.seed}
    _, step = plan.store.step("screen", weights_key, config)
    folder = step / SCREEN_KIND
    inputs = {"weights_manifest": artifacts.manifest_hash(weights)}

    def make() -> None:
        metrics = screen_accuracy(weights, plan.audit)
        with artifacts.atomic_dir(folder, kind=SCREEN_KIND) as tmp:
            artifacts.write_json(tmp / ScreenFolder.ACCURACY, metrics)
            artifacts.write_manifest(tmp, SCREEN_KIND, config, inputs=inputs, sources={"weights": weights},
                                     target=folder)

    with plan.store.lock(step):
        result = run_stage("screen", folder, SCREEN_KIND, config, make, inputs=inputs, sources={"weights": weights})
    _record(row, plan.store, "screen", result)
    metrics = artifacts.read_json(folder / ScreenFolder.ACCURACY, what="screen")
    row.update({k: metrics.get(k) for k in ("top1_sparse", "top1_dense", "top1_drop", "agreement")})
    row["accuracy_from"] = "screen (PyTorch, pruned weights)"


def screen_accuracy(weights: Path, audit_config) -> dict[str, Any]:
    """Top-1 of the sparse and the dense PyTorch model of `weights` on the audit's evaluation images."""
    import numpy as np
    import torch

    from mpdeploy.audit.evaluate import accuracy_metrics
    from mpdeploy.models.data import load_images
    from mpdeploy.sparsity.pruned import load_pruned

    sparse, dense = load_pruned(weights, "sparse"), load_pruned(weights, "dense", verify=False)
    model_info = sparse.manifest.get("model") or {}
    data = load_images(audit_config.data, sparse.input_shape, split="test",
                       data_config=dict(model_info.get("data_config") or {}), limit=audit_config.max_eval_images,
                       seed=audit_config.seed)
    logits: dict[str, list] = {"sparse": [], "dense": []}
    labels = []
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=64, shuffle=False)
    with torch.no_grad():
        for x, y in loader:
            logits["sparse"].append(sparse.model(x).float().numpy())
            logits["dense"].append(dense.model(x).float().numpy())
            labels.append(np.asarray(y))
    s, d = np.concatenate(logits["sparse"]), np.concatenate(logits["dense"])
    fit = data.num_classes is not None and data.num_classes == s.shape[-1]
    metrics = accuracy_metrics(d, s, np.concatenate(labels) if fit else None)
    metrics["images"] = int(len(s))
    metrics["labels_meaningful"] = bool(fit)
    return artifacts.to_jsonable(metrics)


# ---------------------------------------------------------------------------------------------------
# export -> engine -> audit


def _engine_chain(plan: SweepPlan, configs: TrialConfigs, weights_key: str, weights: Path, kind: str | None,
                  row: dict[str, Any]) -> None:
    from mpdeploy.export.run import export_stage

    key, step = plan.store.step("export", weights_key, configs.export)
    with plan.store.lock(step):
        result = export_stage(configs.export, weights, step / "onnx", False, None)
    _record(row, plan.store, "export", result)
    engine_config = {"backend": plan.backend, "build": configs.build.build_fields(), "kind": kind}
    _, engine_step = plan.store.step("engine", key, engine_config)
    if kind is None:
        done = engine_and_audit(plan, configs.build, step / "onnx", engine_step)
    else:
        done = _on_kind(kind, plan, configs.build, step / "onnx", engine_step)
    for name in ("engine", "audit"):
        row["steps"][name] = done["steps"][name]
        row["folders"][name] = plan.store.relative(Path(done["folders"][name]))
        row["manifests"][name] = done["manifests"][name]
    row["node"]["engine_steps"] = done["node"]
    row["device"] = done["device"]
    row.update(audit_numbers(Path(done["folders"]["audit"])))
    row["accuracy_from"] = "audit (the engines on the evaluation images)"


def engine_and_audit(plan: SweepPlan, build_config, onnx_dir: Path, step: Path) -> dict[str, Any]:
    """Build the engines into `step/engine-<backend>/` and audit them into `step/audit/` (under the step lock).
    The audit records this node as its placement (a reused audit keeps the node that made it)."""
    from mpdeploy.engine.stage import build_engines
    from mpdeploy.audit.run import audit_stage

    _limit_threads(plan.threads)
    node = node_info()
    with plan.store.lock(step):
        engine = build_engines(onnx_dir, plan.backend, build_config, out=step / engine_folder_name(plan.backend),
                               backend_reason=plan.backend_reason)
        audit = audit_stage(engine.path, replace(plan.audit, placement=node), build_config, False, None)
    report = artifacts.read_json(engine.path / EngineFolder.REPORT, what="build report")
    return {"steps": {s: {"status": r.status, "seconds": round(r.seconds, 3)} for s, r in
                      (("engine", engine), ("audit", audit))},
            "folders": {"engine": str(engine.path), "audit": str(audit.path)},
            "manifests": {"engine": artifacts.manifest_hash(engine.path), "audit": artifacts.manifest_hash(audit.path)},
            "node": node, "device": _device_name(report.get("device") or {})}


def _device_name(device: dict[str, Any]) -> str:
    return str(device.get("gpu") or device.get("cpu") or device.get("name") or "unknown")


def _on_kind(kind: str, plan: SweepPlan, build_config, onnx_dir: Path, step: Path) -> dict[str, Any]:
    """engine_and_audit as a Ray task on a node of GPU kind `kind` (the trial's bundle 1 holds that resource)."""
    import ray
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mpdeploy.pipeline.sweep.cluster import kind_resource

    group = get_current_placement_group()
    strategy = None if group is None else PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1)
    task = ray.remote(engine_and_audit).options(num_cpus=plan.threads, resources={kind_resource(kind): 0.001},
                                               scheduling_strategy=strategy, max_retries=0)
    return ray.get(task.remote(plan, build_config, onnx_dir, step))


def audit_numbers(audit_dir: Path) -> dict[str, Any]:
    """The row's numbers from a verified audit: accuracy, and per batch size both engines' latency and the
    speedup with its 95% interval."""
    from mpdeploy.core.kinds import AuditFolder

    result = AuditFolder.open(audit_dir).result()
    summary = result.get("summary") or {}
    latency = {}
    for batch, rec in (result.get("latency") or {}).items():
        interval = rec.get("ratio_interval") or {}
        latency[str(batch)] = {
            "sparse": _stats(rec.get("sparse") or {}), "dense": _stats(rec.get("dense") or {}),
            "speedup": rec.get("ratio_p50"), "speedup_ci95": [interval.get("low"), interval.get("high")],
            "rounds": (rec.get("ratio_spread") or {}).get("rounds")}
    return {"top1_sparse": summary.get("top1_sparse"), "top1_dense": summary.get("top1_dense"),
            "top1_drop": summary.get("top1_drop"), "agreement": summary.get("agreement"),
            "labels_meaningful": summary.get("labels_meaningful"), "audit_passed": result.get("passed"),
            "audit_failures": result.get("failures") or [], "latency": latency,
            "load": (result.get("device") or {}).get("loadavg_before_timing")}


def _stats(stats: dict[str, Any]) -> dict[str, Any]:
    """ms per call (p50, p90, p99) and images per second of one engine at one batch size."""
    return {"p50": stats.get("p50"), "p90": stats.get("p90"), "p99": stats.get("p99"),
            "throughput": stats.get("throughput_img_s")}


def config_record(plan: SweepPlan) -> dict[str, Any]:
    """The plan's configs as JSON (the sweep manifest's config: what a re-run must match)."""
    from mpdeploy.audit.config import reuse_config

    return artifacts.to_jsonable({"model": asdict(plan.spec), "prune": asdict(plan.prune),
                                  "distill": asdict(plan.distill) if plan.distill else None,
                                  "export": asdict(plan.export), "build": plan.build.build_fields(),
                                  "audit": reuse_config(plan.audit), "backend": plan.backend,
                                  "objective": plan.objective.label})
