"""The audit stage: the sparse engine against its dense twin, measured in one run -> `audit/` artifact.

    engines/<name>/audit/
      audit.json        schema mpdeploy.audit/1: verdict, failures, summary, latency, accuracy, sensitivity
      audit.md          the report a person reads (headline verdict, tables, the plots, caveats)
      latency.png       p50 per batch size, p10-p90 error bars, speedup per batch with its spread
      accuracy.png      top-1 / top-5 / agreement / certified fraction
      certified.png     dense margin m against 2x the logit perturbation d, per sample (log scale)
      sensitivity.png   per-layer logit effect of pruning that layer alone vs its MP signal
      manifest.json     the usual artifact manifest

What is measured:
- latency: both engines loaded on one backend in one process; each warmed up, then `repeats`
  interleaved rounds per batch size (A B, B A, A B, ...: who goes first alternates so slow drift in
  clocks or machine load hits both alike). Per-call milliseconds give p50/p90/p99; speedup =
  dense p50 / sparse p50; its spread is the p10..p90 (and IQR) of the per-round ratios.
- accuracy: both engines on the same evaluation images: top-1 / top-5 against labels (when the labels
  fit the model), top-1 agreement sparse vs dense, logit error, and the certified fraction
  (method.md section 6: a sample is certified when its dense margin m = z1 - z2 exceeds 2 d,
  d = ||z_sparse - z_dense||_inf; then no perturbation of that size can change its top-1).
- per-layer sensitivity (PyTorch, CPU): the dense model with ONE layer's mask applied; effect =
  mean over samples of ||z - z_dense||_inf, plus relative L2 and the top-1 flip rate.
- the engine's sparse weights: every pruned layer's weight found in the engine's ONNX is N:M along
  its reduction axis (and 2:4 where the pattern is meant to run on sparse tensor cores).

Gates: top-1 drop > max_top1_drop fails (when the labels do not fit the model, the top-1
disagreement with dense takes its place: it bounds any top-1 drop); a speedup at the largest batch
below min_speedup fails (if set); a pruned weight that is not N:M in the engine, or outputs of the
wrong shape or with NaN/Inf, fail.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy import artifacts
from mpdeploy.engines import load_config
from mpdeploy.errors import MpdeployError
from mpdeploy.kinds import AuditFolder, EngineFolder, PrunedFolder

from mpdeploy.audit.common import (AUDIT_DIR, ENGINE_PREFIX, FP32_REL_TOLERANCE, KIND, SCHEMA, Progress, cpu_only,
                                   fmt_pct, host_info, loadavg, pattern_text)
from mpdeploy.audit.engine import check_engine_weights, check_root, engine_files, io_spec, onnx_for_weights, pick_backend
from mpdeploy.audit.evaluate import eval_workers, image_batches, layer_sensitivity, run_both, torch_reference
from mpdeploy.audit.markdown import render_markdown
from mpdeploy.audit.metrics import labels_fit, measure_latency
from mpdeploy.audit.plots import write_plots
from mpdeploy.audit.timing import accuracy_budget, method_record, policies_for, sensitivity_budget
from mpdeploy.progress import progress_log

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class AuditConfig:
    data: str = "digits"  # "digits" | "synthetic" | ImageFolder DIR
    backend: str | None = None  # which engine-<backend>/ to audit; None = the only / first usable one
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 10  # at most this many calls per engine and batch size before timing (adaptive)
    repeats: int = 30  # at most this many interleaved rounds per batch size
    calls_per_round: int = 3  # back-to-back calls of one engine inside a round
    # Adaptive timing (audit/timing.py): rounds stop once the speed ratio's 95% interval is within
    # +-ratio_tolerance, or the batch's share of time_budget_s is spent, but never before min_rounds.
    min_rounds: int = 5
    ratio_tolerance: float | None = 0.02
    time_budget_s: float | None = 120.0  # accuracy 35%, timing 45% (over batch sizes), sensitivity 20%; None: no bound
    eval_workers: int | None = None  # DataLoader workers for the evaluation data; None: auto
    max_eval_images: int | None = None
    max_top1_drop: float = 0.02  # absolute, as a fraction (0.02 = 2 points)
    min_speedup: float | None = None  # None = no speed gate
    sensitivity_batch: int = 16  # images for the per-layer sensitivity; 0 skips it
    sensitivity: bool = True  # False (--no-sensitivity) skips the per-layer map
    sensitivity_max_layers: int | None = 24  # a spread subset of the pruned layers; None: all
    plots: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = tuple(int(b) for b in self.batch_sizes)
        if not sizes or min(sizes) < 1:
            raise MpdeployError("batch sizes must be positive integers, e.g. --batch-sizes 1,8,32")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(sizes))))
        if self.warmup < 0 or self.repeats < 1 or self.calls_per_round < 1:
            raise MpdeployError("--warmup must be >= 0, --repeats and calls per round >= 1")
        if self.max_eval_images is not None and self.max_eval_images < 1:
            raise MpdeployError(f"--max-eval-images must be at least 1, not {self.max_eval_images}")
        if not 0.0 <= self.max_top1_drop <= 1.0:
            raise MpdeployError(
                f"--max-top1-drop is a fraction in [0, 1] (0.02 = 2 points), not {self.max_top1_drop}"
            )
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise MpdeployError(f"--min-speedup must be positive (e.g. 1.1), not {self.min_speedup}")
        if self.min_rounds < 2 or (self.ratio_tolerance is not None and not self.ratio_tolerance > 0) \
                or (self.time_budget_s is not None and self.time_budget_s < 0):
            raise MpdeployError("--min-rounds must be >= 2, --ratio-tolerance > 0 and --time-budget >= 0 (0: no bound)")
        if self.sensitivity_batch < 0:
            raise MpdeployError(f"--sensitivity-batch must be >= 0 (0 skips it), not {self.sensitivity_batch}")




def audit_sources(engine: EngineFolder) -> dict[str, Path]:
    """What an audit of `engine` is made from: the engine and the exact weights it was built from."""
    sources = {"engine": engine.path}
    weights = engine.source_path("weights")
    if weights is not None:
        sources["weights"] = weights
    return sources


def audit_inputs(engine: EngineFolder) -> dict[str, str]:
    """The audit's reuse inputs: the engine's manifest hash and its weights' (when it records them)."""
    inputs = {"engine_manifest": artifacts.manifest_hash(engine.path)}
    weights = engine.source_path("weights")
    if weights is not None:
        inputs["pruned_manifest"] = artifacts.manifest_hash(weights)
    return inputs


def audit(engine_root: Path, config: AuditConfig, progress: Progress | None = None, runtime=None) -> Path:
    """Audit `engine_root/engine-<backend>/` (sparse vs dense) and write `engine_root/audit/`. Returns its path.

    The engine is opened verified with its chain; the PyTorch reference, the weight check and the
    per-layer sensitivity use the weights the engine records as its source (distilled or pruned).
    `runtime` (a BuildConfig) overrides the run-time options recorded with the engine (threads)."""
    from mpdeploy.data import load_images

    engine_root = Path(engine_root)
    check_root(engine_root)
    step = progress_log(progress, "audit")
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [t_start]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    backend_name = pick_backend(engine_root, config.backend)
    engine_dir = engine_root / f"{ENGINE_PREFIX}{backend_name}"
    engine = EngineFolder.open(engine_dir)  # every file hashed, nothing unlisted, its sources unchanged
    manifest = engine.manifest
    files = engine_files(engine)
    weights_folder: PrunedFolder | None = engine.weights()
    pruned_dir = None if weights_folder is None else weights_folder.path
    pruned = None if weights_folder is None else weights_folder.manifest
    layers = list((pruned or {}).get("layers") or [])
    chw, fixed_batch, classes, data_config = io_spec(manifest, pruned)
    precision = manifest.get("precision")

    failures: list[str] = []
    warnings: list[str] = []
    if pruned is None:
        warnings.append("the engine records no weights source (built by an older mpdeploy): per-layer "
                        "sensitivity, MP signals and the weight check against the pruned masks are skipped")

    # --- data
    data = load_images(config.data, chw, split="test", data_config=data_config,
                       limit=config.max_eval_images or (256 if config.data == "synthetic" else None), seed=config.seed)
    if len(data) == 0:
        raise MpdeployError(f"evaluation data {config.data!r} holds no images; pass --data DIR|digits|synthetic")
    if data.synthetic:
        warnings.append("synthetic N(0,1) inputs: accuracy numbers describe noise, not images; use --data DIR")

    lap("read_inputs_s")
    # --- engines
    from mpdeploy.backends.base import create_backend

    backend = create_backend(backend_name)
    runner_config = load_config(manifest, config.batch_sizes, getattr(runtime, "threads", None))
    runners = {}
    try:
        for variant in ("dense", "sparse"):
            try:
                runners[variant] = backend.load(files[variant], runner_config)
            except MpdeployError:
                raise
            except Exception as exc:  # a corrupt engine file the manifest was made to match: one line
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                raise MpdeployError(f"{files[variant]} cannot be loaded by {backend_name} ({type(exc).__name__}: "
                                    f"{first}); the engine file is corrupt: rebuild it with mpdeploy engine "
                                    "or mpdeploy build --force") from None
        runtime = dict(backend.device_info() or {})
        host = host_info()
        batch_sizes = list(config.batch_sizes)
        profile = ((manifest.get("config") or {}).get("build") or {}).get("batch_sizes") or []
        if fixed_batch:
            if fixed_batch not in batch_sizes:
                warnings.append(f"the engines take a fixed batch of {fixed_batch}: only that batch size was timed")
            batch_sizes = [fixed_batch]
        elif backend_name == "trt" and profile and max(batch_sizes) > max(profile):
            # A TensorRT plan's optimization profile ends at the largest batch it was built for.
            too_big = [b for b in batch_sizes if b > max(profile)]
            batch_sizes = [b for b in batch_sizes if b <= max(profile)] or [max(profile)]
            warnings.append(f"batch sizes {too_big} are beyond the engine's optimization profile (built for "
                            f"{profile}): not timed")
        eval_batch = fixed_batch or max(batch_sizes)

        lap("load_engines_s")
        # --- accuracy
        keep = max(max(batch_sizes), config.sensitivity_batch, 8)
        try:
            logits, y_all, x_head, run_failures = run_both(
                runners, image_batches(data.dataset, eval_batch, eval_workers(data.dataset, config.eval_workers)),
                fixed_batch, classes, keep,
                total=math.ceil(len(data) / eval_batch), progress=step, budget_s=accuracy_budget(config))
        except MpdeployError:
            raise
        except Exception as exc:  # the runtime refused the input: say which and how to fix it
            raise MpdeployError(
                f"the {backend_name} engines in {engine_dir} could not run a batch of {eval_batch} images of shape "
                f"{list(chw)} ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                "pass --batch-sizes within what the engine was built for, or rebuild it"
            ) from exc
        failures += run_failures
        accuracy: dict[str, Any] | None = None
        labels_ok, labels_why = False, "not evaluated"
        if logits is not None:  # a StreamedAccuracy: per-image numbers, not the full logits
            dense_top1 = logits.dense_top1() if data.num_classes else None
            labels_ok, labels_why = labels_fit(data.kind, data.num_classes, logits.classes, dense_top1, len(y_all))
            accuracy = logits.metrics(labels_ok)
            if logits.stopped != "all images":
                warnings.append(f"accuracy on {logits.count} of {len(data)} images (a seeded random sample): the "
                                "time budget ran out; pass --time-budget 0 (or a larger one) to evaluate them all")
            accuracy["labels_meaningful"], accuracy["labels_note"] = labels_ok, labels_why
            if not labels_ok:
                warnings.append(f"labels not used: {labels_why}; the accuracy gate uses top-1 agreement with the "
                                "dense engine instead (disagreement bounds any top-1 drop)")

        lap("accuracy_s")
        # --- latency
        inputs = {}
        for b in batch_sizes:
            reps = math.ceil(b / len(x_head))
            inputs[b] = np.ascontiguousarray(np.concatenate([x_head] * reps)[:b])
        load_before = loadavg()
        latency_raw: dict[int, dict[str, Any]] = {}
        policies = policies_for(config, list(inputs))
        for b, xb in inputs.items():
            try:
                latency_raw.update(measure_latency(runners, {b: xb}, config.warmup, config.repeats,
                                                   config.calls_per_round, step, policies=policies))
            except Exception as exc:  # an engine outside its optimization profile: report, keep going
                logger.warning("batch %d could not be timed: %s", b, exc)
                failures.append(f"batch {b}: an engine failed to run ({type(exc).__name__}: {str(exc)[:160]})")
        load_after = loadavg()

        lap("latency_s")
        # --- engine vs PyTorch reference (same images)
        reference = None
        if pruned is not None and logits is not None:
            n_ref = min(len(x_head), max(config.sensitivity_batch, 8))
            try:
                ref = torch_reference(pruned_dir, x_head[:n_ref])
                reference = {}
                for which in ("sparse", "dense"):
                    err = float(np.abs(ref[which] - logits.head_logits(which)[:n_ref]).max())
                    scale = float(np.abs(ref[which]).max()) or 1.0
                    reference[which] = {"max_abs_diff": err, "relative": err / scale}
                reference["images"] = n_ref
                reference["weights"] = pruned_dir.name  # the engine's recorded weights source
            except MpdeployError as exc:
                warnings.append(f"PyTorch reference not computed: {exc}")
    finally:
        for r in runners.values():
            try:
                r.close()
            except Exception as exc:  # closing must not hide the audit's own result
                logger.debug("closing a runner failed: %s", exc)

    if reference is not None and (precision in (None, "fp32")):
        for which in ("sparse", "dense"):
            if reference[which]["relative"] > FP32_REL_TOLERANCE:
                warnings.append(f"the {which} engine differs from the PyTorch model of its weights source "
                                f"{pruned_dir.name}/ by {reference[which]['max_abs_diff']:.3g} (relative "
                                f"{reference[which]['relative']:.2g}) at fp32: it may not have been built from this "
                                f"{pruned_dir.name}/ artifact, its recorded weights source")

    lap("pytorch_reference_s")
    # --- weights
    weights: dict[str, Any] | None = None
    onnx_path, onnx_note = onnx_for_weights(engine, files["sparse"])
    if onnx_path is not None and pruned is not None:
        from safetensors.numpy import load_file

        masks = {k: v.astype(bool) for k, v in load_file(str(weights_folder.masks_file)).items()}
        weights = check_engine_weights(onnx_path, layers, masks)
        weights["note"] = onnx_note
        bad = weights["violations"]
        if bad:
            failures.append(
                f"{len(bad)} of {weights['checked']} pruned layers are not N:M-compliant in "
                f"{onnx_path.relative_to(engine_root) if onnx_path.is_relative_to(engine_root) else onnx_path} "
                f"(e.g. {bad[0]['layer']}: {bad[0]['problem']})"
            )
    elif pruned is not None:
        warnings.append(f"engine weights not checked: {onnx_note}")

    lap("weights_check_s")
    # --- sensitivity
    sensitivity = None
    if pruned is not None and config.sensitivity and config.sensitivity_batch > 0:
        sensitivity = layer_sensitivity(pruned_dir, x_head[: config.sensitivity_batch], layers,
                                        config.sensitivity_max_layers, sensitivity_budget(config), step)

    lap("sensitivity_s")
    # --- gates
    if accuracy is not None:
        if labels_ok:
            gate = {"metric": "top1_drop", "value": accuracy["top1_drop"], "max": config.max_top1_drop}
            if accuracy["top1_drop"] > config.max_top1_drop + 1e-12:
                failures.append(f"top-1 drop {100 * accuracy['top1_drop']:.2f} pts > {100 * config.max_top1_drop:.2f} "
                                f"pts ({fmt_pct(accuracy['top1_dense'], 2)} -> {fmt_pct(accuracy['top1_sparse'], 2)})")
        else:
            disagreement = 1.0 - accuracy["agreement"]
            gate = {"metric": "top1_disagreement", "value": disagreement, "max": config.max_top1_drop}
            if disagreement > config.max_top1_drop + 1e-12:
                failures.append(f"top-1 disagreement with dense {100 * disagreement:.2f} pts > "
                                f"{100 * config.max_top1_drop:.2f} pts (labels not usable: {labels_why})")
    else:
        gate = {"metric": None, "value": None, "max": config.max_top1_drop}
    speed_gate = None
    if latency_raw:
        largest = max(latency_raw)
        speed_gate = {"batch": largest, "speedup_p50": latency_raw[largest]["ratio_p50"], "min": config.min_speedup}
        if config.min_speedup is not None and not latency_raw[largest]["ratio_p50"] >= config.min_speedup:
            failures.append(f"speedup at batch {largest} is {latency_raw[largest]['ratio_p50']:.3f}x "
                            f"< required {config.min_speedup:g}x")
    elif config.min_speedup is not None:
        failures.append("no batch size could be timed, so the speed gate cannot pass")

    # --- caveats
    if cpu_only(backend_name, runtime):
        warnings.append("ONNX Runtime's CPU provider has no 2:4 sparse kernels: it multiplies the zeros like any "
                        "other weight, so a speedup near 1.0x is expected here; it shows the sparse engine costs "
                        "nothing extra, not what sparse tensor cores would give")
    audit_only = sorted({r["pattern"] for r in layers if r.get("pattern") and not r.get("runs_sparse")})
    if audit_only:
        warnings.append(f"layers pruned to {', '.join(audit_only)} have no sparse-tensor-core path: they run dense "
                        "on every backend; their MAC reduction is accounting only")
    cores = host.get("cpu_count") or 1
    busiest = max((load_before or [0])[0], (load_after or [0])[0])
    if busiest > cores:
        warnings.append(f"the machine was busy while timing (load average {busiest:.1f} on {cores} cores): "
                        "latency is noisy; interleaving keeps the ratio fair, but re-run on an idle machine")
    if latency_raw and min(latency_raw) <= 2 and latency_raw[min(latency_raw)]["ratio_p50"] < 0.95 \
            and not cpu_only(backend_name, runtime):
        warnings.append("the sparse engine is slower at the smallest batch: tiny batches often are with sparse kernels")
    rho = (sensitivity or {}).get("spearman_signal_vs_effect")
    if rho is not None and rho > 0.3 and len(sensitivity["layers"]) >= 5:
        worst = sorted(sensitivity["layers"], key=lambda r: -r["logit_effect"])[:2]
        median = float(np.median([r["signal"] for r in sensitivity["layers"] if r["signal"] is not None]))
        named = ", ".join(f"{r['layer']} (signal {r['signal']:.2f})" for r in worst if r["signal"] is not None)
        warnings.append(
            f"the MP signal runs with the measured sensitivity here (Spearman {rho:+.2f}; the budget assumes higher "
            f"signal = safer): the most sensitive layers are {named}, the median signal is {median:.2f}; the mp "
            "budget may be pruning the wrong layers of this model: compare with --budget uniform"
        )
    if accuracy is not None and accuracy["images"] < 200:
        warnings.append(f"only {accuracy['images']} evaluation images: one image is "
                        f"{100 / accuracy['images']:.2f} pts of top-1")

    latency = {str(b): v for b, v in sorted(latency_raw.items())}
    totals = (pruned or {}).get("totals") or {}
    pconf = (pruned or {}).get("config") or {}
    summary = {
        "model": ((pruned or {}).get("model") or {}).get("name") or engine_root.name,
        "pattern": pattern_text(layers),
        "budget": pconf.get("budget"),
        "saliency": pconf.get("saliency"),
        "mac_reduction": totals.get("mac_reduction"),
        "sparse_execution_mac_reduction": totals.get("sparse_execution_mac_reduction"),
        "labels_meaningful": labels_ok,
        "eval_images": int(len(y_all)),
        "accuracy_gate": gate["metric"],
        **{k: (accuracy or {}).get(k) for k in (
            "top1_dense", "top1_sparse", "top1_drop", "top1_drop_stderr", "top5_dense", "top5_sparse", "top5_drop",
            "agreement", "certified_fraction", "max_logit_error", "mean_logit_error")},
        "speedup_p50": {b: v["ratio_p50"] for b, v in latency.items()},
        "speedup_spread_p10_p90": {b: [v["ratio_spread"]["p10"], v["ratio_spread"]["p90"]] for b, v in latency.items()},
        "weights_nm_compliant": None if weights is None else not weights["violations"],
    }
    engine_manifest_sha = artifacts.manifest_hash(engine_dir)
    result = {
        "schema": SCHEMA,
        "backend": backend_name,
        "passed": not failures,
        "failures": failures,
        "warnings": warnings,
        "summary": summary,
        "device": {"engine_manifest": manifest.get("device"), "runtime": runtime, "host": host,
                   "precision": precision, "loadavg_before_timing": load_before, "loadavg_after_timing": load_after},
        "data": {"source": config.data, "kind": data.kind, "description": data.description,
                 "classes": data.num_classes, "images": int(len(y_all)), "split": "test",
                 "labels_meaningful": labels_ok, "labels_note": labels_why},
        "latency": latency,
        "latency_method": {
            "warmup_calls": config.warmup, "rounds": config.repeats, "calls_per_round": config.calls_per_round,
            "order": "interleaved; dense first in even rounds, sparse first in odd rounds",
            "speedup": "dense p50 / sparse p50 (>1: sparse faster); spread = percentiles of per-round ratios",
            "throughput": "batch / mean call time",
            "timer": "Runner.time(): per call, device-synchronized, input already on the device",
            **method_record(config, policies),
        },
        "accuracy": accuracy,
        "engine_vs_pytorch": reference,
        "weights": weights,
        "sensitivity": sensitivity["layers"] if sensitivity else [],
        "sensitivity_summary": {k: v for k, v in sensitivity.items() if k != "layers"} if sensitivity else None,
        "thresholds": {"max_top1_drop": config.max_top1_drop, "min_speedup": config.min_speedup,
                       "accuracy_gate": gate, "speed_gate": speed_gate},
        "engine": {"folder": engine_dir.name, "files": {k: v.name for k, v in files.items()},
                   "precision": precision, "manifest_sha256": engine_manifest_sha,
                   "build_report": "build_report.json" if (engine_dir / "build_report.json").is_file() else None},
        "config": artifacts.to_jsonable(asdict(config)),
        "started": started.isoformat(timespec="seconds"),
        "seconds": None,
        "timings": timings,
    }

    out = engine_root / AUDIT_DIR
    with artifacts.atomic_dir(out, kind=KIND) as tmp:
        plots = []
        if config.plots:
            step("plots", 0, 1)
            plots = write_plots(result, logits.samples() if logits is not None else None, tmp)
            step("plots", 1, 1)
        result["plots"] = plots
        lap("plots_s")
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        artifacts.write_json(tmp / "audit.json", result)
        artifacts.atomic_write_text(tmp / "audit.md", render_markdown(result, engine_root))
        artifacts.write_manifest(tmp, KIND, config, inputs=audit_inputs(engine), sources=audit_sources(engine),
                                 target=out,
                                 extra={"backend": backend_name, "passed": not failures})
    logger.info("audit of %s: %s -> %s", engine_root, "PASS" if not failures else "FAIL", out)
    return out


def read_audit(engine_root: Path) -> dict[str, Any]:
    """The audit result of `engine_root`, opened verified: its files, and the engine and weights it audited
    unchanged since (a forged or stale audit is refused)."""
    return AuditFolder.open(Path(engine_root) / AUDIT_DIR).result()


def verdict_line(result: Mapping[str, Any], path: Path | str) -> str:
    """One line for the terminal: PASS/FAIL, the headline numbers, the path."""
    s = result["summary"]
    parts = ["PASS" if result["passed"] else "FAIL", str(path)]
    if s.get("top1_dense") is not None:
        parts.append(f"top-1 {fmt_pct(s['top1_dense'], 2)} -> {fmt_pct(s['top1_sparse'], 2)}")
    if s.get("agreement") is not None:
        parts.append(f"agreement {fmt_pct(s['agreement'])}, certified {fmt_pct(s['certified_fraction'])}")
    if s.get("speedup_p50"):
        parts.append("speedup " + " ".join(f"b{b} {v:.2f}x" for b, v in s["speedup_p50"].items()))
    parts.append(f"on {result['backend']}")
    return " | ".join(parts)
