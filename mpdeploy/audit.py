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
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpdeploy import artifacts
from mpdeploy.backends import base as backends
from mpdeploy.errors import MpdeployError
from mpdeploy.machine import cpu_model

logger = logging.getLogger(__name__)

SCHEMA = "mpdeploy.audit/1"
KIND = "audit"
AUDIT_DIR = "audit"
ENGINE_PREFIX = "engine-"
# A dense top-1 this many binomial standard errors above chance counts as "the labels fit the model".
CHANCE_SIGMAS = 3.0
# Engine vs PyTorch logits: beyond this relative error (fp32 engines) the engine is not computing the
# pruned model; a warning, not a gate, since reduced precision legitimately moves logits.
FP32_REL_TOLERANCE = 1e-3

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AuditConfig:
    data: str = "digits"  # "digits" | "synthetic" | ImageFolder DIR
    backend: str | None = None  # which engine-<backend>/ to audit; None = the only / first usable one
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 10  # calls per engine and batch size before timing
    repeats: int = 30  # interleaved rounds per batch size
    calls_per_round: int = 3  # back-to-back calls of one engine inside a round
    max_eval_images: int | None = None
    max_top1_drop: float = 0.02  # absolute, as a fraction (0.02 = 2 points)
    min_speedup: float | None = None  # None = no speed gate
    sensitivity_batch: int = 32  # images for the per-layer sensitivity; 0 skips it
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
        if self.sensitivity_batch < 0:
            raise MpdeployError(f"--sensitivity-batch must be >= 0 (0 skips it), not {self.sensitivity_batch}")


# ---------------------------------------------------------------------------------------------------
# pure metrics


def certified_mask(dense_logits: np.ndarray, sparse_logits: np.ndarray) -> np.ndarray:
    """Per sample: dense top-1 margin m = z1 - z2 > 2 * ||z_sparse - z_dense||_inf.

    Any logit perturbation of inf-norm d moves the margin by at most 2 d, so a certified sample keeps
    its dense top-1 under the sparse engine. Ties (m = 0) are never certified.
    """
    dense = np.asarray(dense_logits, dtype=np.float64)
    sparse = np.asarray(sparse_logits, dtype=np.float64)
    if dense.shape != sparse.shape or dense.ndim != 2 or dense.shape[1] < 2:
        raise ValueError(f"need two [N, C>=2] logit arrays of one shape, got {dense.shape} and {sparse.shape}")
    return dense_margins(dense) > 2.0 * logit_distance(dense, sparse)


def dense_margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit per sample."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def logit_distance(dense_logits: np.ndarray, sparse_logits: np.ndarray) -> np.ndarray:
    """||z_sparse - z_dense||_inf per sample."""
    return np.abs(np.asarray(sparse_logits, np.float64) - np.asarray(dense_logits, np.float64)).max(axis=1)


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Bool per sample: the label is among the k largest logits."""
    top = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def labels_fit(data_kind: str, data_classes: int | None, num_outputs: int, dense_top1: float | None,
               n: int) -> tuple[bool, str]:
    """Do the evaluation labels mean something for this model? (decides the accuracy gate)"""
    if data_kind == "synthetic":
        return False, "synthetic noise has no labels"
    if data_classes is None:
        return False, "the data carries no class labels"
    if data_classes != num_outputs:
        return False, f"the data has {data_classes} classes but the model has {num_outputs} outputs"
    chance = 1.0 / num_outputs
    threshold = chance + CHANCE_SIGMAS * math.sqrt(chance * (1 - chance) / max(n, 1))
    if dense_top1 is None or dense_top1 <= threshold:
        return False, (f"the dense engine's top-1 ({dense_top1:.1%}) is at chance level ({chance:.1%} for "
                       f"{num_outputs} classes): the labels do not fit this model (random init, or another task)")
    return True, f"{data_classes} classes; dense top-1 {dense_top1:.1%} is well above chance ({chance:.1%})"


def latency_stats(ms: Sequence[float], batch: int) -> dict[str, float]:
    arr = np.asarray(ms, dtype=np.float64)
    p10, p50, p90, p99 = np.percentile(arr, [10, 50, 90, 99])
    mean = float(arr.mean())
    return {
        "p50": float(p50), "p90": float(p90), "p99": float(p99), "p10": float(p10), "mean": mean,
        "min": float(arr.min()), "max": float(arr.max()), "samples": int(arr.size),
        # Sustained rate of back-to-back calls (mean, not p50: the slow calls cost time too).
        "throughput_img_s": float(batch * 1000.0 / mean) if mean > 0 else float("inf"),
    }


def measure_latency(runners: Mapping[str, Any], inputs: Mapping[int, np.ndarray], warmup: int, repeats: int,
                    calls_per_round: int, progress: Progress | None = None) -> dict[int, dict[str, Any]]:
    """Interleaved timing of the "dense" and "sparse" runners, per batch size.

    Round r runs dense then sparse when r is even, sparse then dense when odd. Each engine is warmed
    up right before its batch size is timed (the previous batch size may have left other kernels hot).
    """
    out: dict[int, dict[str, Any]] = {}
    order = ("dense", "sparse")
    total = len(inputs) * repeats
    done = 0
    for batch, x in inputs.items():
        for name in order:
            if warmup:
                runners[name].time(x, warmup)
        samples: dict[str, list[float]] = {name: [] for name in order}
        rounds: list[float] = []
        for r in range(repeats):
            per_round = {}
            for name in order if r % 2 == 0 else order[::-1]:
                ms = [float(v) for v in runners[name].time(x, calls_per_round)]
                samples[name].extend(ms)
                per_round[name] = float(np.median(ms))
            rounds.append(per_round["dense"] / per_round["sparse"] if per_round["sparse"] > 0 else float("nan"))
            done += 1
            if progress:
                progress("latency", done, total)
        dense, sparse = latency_stats(samples["dense"], batch), latency_stats(samples["sparse"], batch)
        ratios = np.asarray(rounds)
        q = np.nanpercentile(ratios, [10, 25, 50, 75, 90])
        out[batch] = {
            "dense": dense,
            "sparse": sparse,
            # >1 means the sparse engine is faster.
            "ratio_p50": dense["p50"] / sparse["p50"] if sparse["p50"] > 0 else float("nan"),
            "ratio_spread": {"p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                             "p90": float(q[4]), "iqr": float(q[3] - q[1]), "rounds": len(rounds)},
            "round_ratios": [float(v) for v in ratios],
        }
    return out


# ---------------------------------------------------------------------------------------------------
# reading the engine folder


def engine_backends(engine_root: Path) -> list[str]:
    """Backends with an engine-<backend>/ folder under `engine_root`, in preference order."""
    present = [b for b in backends.REGISTRY if (engine_root / f"{ENGINE_PREFIX}{b}").is_dir()]
    others = sorted(p.name[len(ENGINE_PREFIX):] for p in engine_root.glob(f"{ENGINE_PREFIX}*")
                    if p.is_dir() and p.name[len(ENGINE_PREFIX):] not in backends.REGISTRY)
    return present + others


def _check_root(engine_root: Path) -> None:
    if not engine_root.exists():
        raise MpdeployError(f"engine folder not found: {engine_root}; pass engines/<name> as made by mpdeploy build")
    if not engine_root.is_dir():
        raise MpdeployError(f"{engine_root} is a file; pass the engine folder engines/<name>")
    if not engine_backends(engine_root):
        raise MpdeployError(
            f"{engine_root} is not an engine root (no engine-<backend>/ folder inside); "
            "pass engines/<name> after mpdeploy build"
        )


def pick_backend(engine_root: Path, wanted: str | None) -> str:
    present = engine_backends(engine_root)
    if wanted is not None:
        if wanted not in backends.REGISTRY:
            raise MpdeployError(f"unknown backend {wanted!r}; choose one of {', '.join(backends.REGISTRY)}")
        if wanted not in present:
            raise MpdeployError(
                f"{engine_root} has no {ENGINE_PREFIX}{wanted}/ (present: {', '.join(present)}); "
                "build it first or pick another --backend"
            )
        return wanted
    known = [b for b in present if b in backends.REGISTRY]
    if not known:
        raise MpdeployError(f"{engine_root}: no engine of a known backend ({', '.join(present)}); rebuild it")
    if len(known) == 1:
        return known[0]
    reasons = []
    for name in known:  # several engines: the first one this machine can run
        ok, why = backends.backend_class(name).availability()
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise MpdeployError(f"none of the engines in {engine_root} can run here ({'; '.join(reasons)}); "
                        "audit them on a machine with the right GPU / libraries")


def _engine_files(engine_dir: Path, manifest: Mapping[str, Any]) -> dict[str, Path]:
    files = manifest.get("variants") or {}
    missing = [v for v in backends.VARIANTS if not isinstance(files.get(v), str)]
    if missing:
        raise MpdeployError(
            f"{engine_dir}/manifest.json names no {' and no '.join(missing)} engine; the audit compares a sparse "
            "engine with its dense twin: rebuild with mpdeploy build --sparse"
        )
    paths = {v: engine_dir / files[v] for v in backends.VARIANTS}
    for variant, path in paths.items():
        if not path.is_file():
            raise MpdeployError(f"{variant} engine {path} is missing; rebuild the engine folder")
    hashes = manifest.get("file_sha256") or {}
    for variant, path in paths.items():
        expected = hashes.get(files[variant])
        if expected and artifacts.sha256_file(path) != expected:
            raise MpdeployError(
                f"{path} does not match the sha256 in its manifest (modified or corrupt); rebuild the engine"
            )
    return paths


def _read_optional_manifest(folder: Path, kind: str) -> dict[str, Any] | None:
    if not (folder / artifacts.MANIFEST).is_file():
        return None
    return artifacts.read_manifest(folder, kind, verify=True)


def _io_spec(manifest: Mapping[str, Any], pruned: Mapping[str, Any] | None) -> tuple[tuple[int, ...], int | None,
                                                                                       int | None, dict]:
    """(input C,H,W, fixed batch or None, number of outputs or None, data_config)."""
    io = manifest.get("io") or {}
    inputs, outputs = io.get("inputs") or [], io.get("outputs") or []
    shape = list(inputs[0].get("shape") or []) if inputs else []
    model = (pruned or {}).get("model") or {}
    if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
        chw = tuple(shape[1:])
    elif model.get("input_shape"):
        chw = tuple(model["input_shape"])
    else:
        raise MpdeployError("the engine manifest has no 4-D input shape in io.inputs and no pruned/ folder says it; "
                            "rebuild the engine")
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    out_shape = list(outputs[0].get("shape") or []) if outputs else []
    classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) and out_shape[-1] > 0 else None
    classes = classes or model.get("num_classes")
    return chw, fixed, classes, dict(model.get("data_config") or {})


# ---------------------------------------------------------------------------------------------------
# engine weights: are the pruned layers N:M inside the engine?


def _onnx_for_weights(engine_root: Path, engine_file: Path) -> tuple[Path | None, str]:
    if engine_file.suffix == ".onnx":
        return engine_file, "the sparse engine file itself"
    source = engine_root / "onnx" / "model.onnx"
    if source.is_file():
        return source, f"the ONNX the {engine_file.suffix or 'engine'} file was built from (its weights are not inspectable)"
    return None, f"{engine_file.name} is opaque and no onnx/model.onnx is present"


def _annotations(proto) -> dict[str, dict[str, Any]]:
    import json

    for entry in proto.metadata_props:
        if entry.key == "mpdeploy.sparsity":
            try:
                return dict(json.loads(entry.value).get("tensors") or {})
            except (ValueError, AttributeError):
                return {}
    return {}


def check_engine_weights(onnx_path: Path, layers: Sequence[Mapping[str, Any]],
                         masks: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Find each pruned layer's weight in the engine ONNX and check its N:M pattern along the reduction axis.

    Found by the exporter's `mpdeploy.sparsity` annotation first; else by the mask: the one initializer of
    the layer's shape (or transposed, for MatMul weights) that is zero wherever the pruned mask is zero
    (this survives renaming and BatchNorm folding, which scales rows but keeps zeros).
    """
    import onnx

    from mpdeploy.export import check_trt_sparsity, nm_compliant_along, tensor_array
    from mpdeploy.patterns import NM, parse_pattern

    proto = onnx.load(str(onnx_path))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    inits = {t.name: t for t in proto.graph.initializer if t.data_type in float_types}
    annotations = _annotations(proto)
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = tensor_array(inits[name])
        return arrays[name]

    by_param = {a.get("param"): (name, a) for name, a in annotations.items() if name in inits}
    claimed: set[str] = set()
    records = []
    for layer in layers:
        if not layer.get("pattern"):
            continue
        pattern = parse_pattern(layer["pattern"])
        param = layer["param"]
        rec: dict[str, Any] = {"layer": layer["name"], "param": param, "pattern": str(pattern),
                               "runs_sparse": pattern.runs_sparse, "initializer": None, "axis": None,
                               "found_by": None, "nm_compliant": False, "is_2_4": False, "problem": None}
        hit = by_param.get(param)
        if hit is not None:
            rec.update(initializer=hit[0], axis=int(hit[1].get("axis", 1)), found_by="annotation")
        elif param in masks:
            mask = np.asarray(masks[param], dtype=bool)
            # A MatMul holds the Linear weight transposed ([in, out]): its groups run along axis 0.
            shapes = [(mask, 1)] + ([(mask.T, 0)] if mask.ndim == 2 else [])
            same_shape = [(name, m, axis) for name, tensor in inits.items() if name not in claimed
                          for m, axis in shapes if tuple(tensor.dims) == m.shape]
            # Nonzero candidates first; an all-zero weight (BatchNorm with gamma = 0 folded in) matches any
            # mask, so it is taken only when nothing else fits.
            for want_nonzero in (True, False):
                for name, m, axis in same_shape:
                    arr = array(name)
                    if name not in claimed and bool(np.any(arr != 0)) == want_nonzero and not np.any((arr != 0) & ~m):
                        rec.update(initializer=name, axis=axis, found_by="mask" if want_nonzero else "mask (all-zero weight)")
                        break
                if rec["initializer"]:
                    break
            same_shape = [(name, axis) for name, _, axis in same_shape]
            if rec["initializer"] is None:
                nm_anywhere = [n for n, axis in same_shape if nm_compliant_along(array(n), axis, pattern)]
                rec["candidates"] = len(same_shape)
                rec["problem"] = (
                    "an engine weight of this shape is N:M but not with the pruned mask: the engine does not hold "
                    "the pruned weights" if nm_anywhere else
                    f"no engine weight of shape {list(mask.shape)} is {pattern} along the input-channel axis"
                )
        else:
            rec["problem"] = "no mask for this layer in the pruned artifact"
        if rec["initializer"]:
            claimed.add(rec["initializer"])
            arr = array(rec["initializer"])
            rec["shape"] = list(arr.shape)
            rec["nm_compliant"] = nm_compliant_along(arr, rec["axis"], pattern)
            rec["is_2_4"] = nm_compliant_along(arr, rec["axis"], NM(2, 4))
            if not rec["nm_compliant"]:
                rec["problem"] = f"not {pattern} along axis {rec['axis']} (the reduction axis)"
            elif pattern.runs_sparse and not rec["is_2_4"]:
                rec["problem"] = f"{pattern} but not 2:4 along axis {rec['axis']}"
        records.append(rec)
    trt = check_trt_sparsity(proto)
    return {
        "source": str(onnx_path),
        "checked": len(records),
        "ok": sum(r["problem"] is None for r in records),
        "violations": [r for r in records if r["problem"] is not None],
        "tensors": records,
        "trt_rules": {"weights_seen": len(trt), "eligible": sum(v["eligible"] for v in trt.values()),
                      "eligible_and_2_4": sum(v["eligible"] and v["is_2_4"] for v in trt.values())},
    }


# ---------------------------------------------------------------------------------------------------
# running the engines


def image_batches(dataset, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 images, labels) in dataset order; streamed, so a large ImageFolder never sits in memory."""
    import torch

    for xb, yb in torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0):
        yield np.ascontiguousarray(xb.numpy().astype(np.float32)), yb.numpy()


def _pad(x: np.ndarray, fixed: int | None) -> np.ndarray:
    """A fixed-batch engine gets a short last batch padded with copies of its last image."""
    if fixed and len(x) < fixed:
        x = np.concatenate([x, np.repeat(x[-1:], fixed - len(x), axis=0)])
    return np.ascontiguousarray(x)


def run_both(runners: Mapping[str, Any], batches: Iterable[tuple[np.ndarray, np.ndarray]], fixed: int | None,
             classes: int | None, keep: int, total: int | None = None, progress: Progress | None = None,
             ) -> tuple[dict[str, np.ndarray] | None, np.ndarray, np.ndarray, list[str]]:
    """Both engines over the evaluation batches.

    Returns (logits {"dense", "sparse"} or None when an output has the wrong shape or NaN/Inf, labels,
    the first `keep` images (for timing, the PyTorch reference and the sensitivity map), failures).
    """
    outs: dict[str, list[np.ndarray]] = {"dense": [], "sparse": []}
    labels: list[np.ndarray] = []
    head: list[np.ndarray] = []
    kept = 0
    failures: list[str] = []
    seen = 0
    for i, (x, y) in enumerate(batches):
        if kept < keep:
            head.append(x[: keep - kept])
            kept += len(head[-1])
        valid = len(x)
        chunk = _pad(x, fixed)
        got = {name: np.asarray(runners[name].run(chunk)) for name in ("dense", "sparse")}
        want = (len(chunk), classes) if classes else None
        for name, out in got.items():
            if out.ndim != 2 or out.shape[0] != len(chunk) or (want and out.shape != want):
                failures.append(f"{name} engine output has shape {list(out.shape)} for a batch of {len(chunk)}, "
                                f"expected {list(want) if want else [len(chunk), 'classes']}")
        if not failures and got["dense"].shape != got["sparse"].shape:
            failures.append(f"sparse engine output shape {list(got['sparse'].shape)} differs from the dense "
                            f"engine's {list(got['dense'].shape)}")
        for name, out in got.items():
            if not failures and not np.all(np.isfinite(out[:valid])):
                failures.append(f"{name} engine output holds NaN or Inf (images {seen}..{seen + valid - 1})")
            outs[name].append(out[:valid].astype(np.float32))
        labels.append(np.asarray(y))
        seen += valid
        if failures:
            break
        if progress:
            progress("accuracy", i + 1, total or i + 1)
    images = np.concatenate(head) if head else np.zeros((0,), np.float32)
    label_arr = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    if failures:
        return None, label_arr, images, failures
    return {name: np.concatenate(v) for name, v in outs.items()}, label_arr, images, failures


def accuracy_metrics(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Everything the audit reports about accuracy, from the two logit arrays (and labels, if they fit)."""
    n, classes = dense.shape
    pred_d, pred_s = dense.argmax(1), sparse.argmax(1)
    diff = np.abs(sparse.astype(np.float64) - dense.astype(np.float64))
    d = diff.max(axis=1)
    margins = dense_margins(dense) if classes >= 2 else np.full(n, np.inf)
    certified = margins > 2 * d
    out: dict[str, Any] = {
        "images": int(n),
        "classes": int(classes),
        "agreement": float((pred_d == pred_s).mean()),
        "disagreements": int((pred_d != pred_s).sum()),
        "certified_fraction": float(certified.mean()),
        "certified": int(certified.sum()),
        "max_logit_error": float(diff.max()),
        "mean_logit_error": float(diff.mean()),
        "mean_linf_error": float(d.mean()),
        "dense_logit_scale": float(np.abs(dense).mean()),
        "margin_quantiles": {k: float(v) for k, v in zip(("p10", "p50", "p90"), np.percentile(margins, [10, 50, 90]))},
        "perturbation_quantiles": {k: float(v) for k, v in zip(("p10", "p50", "p90"), np.percentile(d, [10, 50, 90]))},
    }
    for k in (1, 5):
        for key in (f"top{k}_dense", f"top{k}_sparse", f"top{k}_drop"):
            out[key] = None
    out["top1_drop_stderr"] = None
    if labels is not None:
        for k in (1, 5) if classes >= 5 else (1,):
            cd, cs = topk_correct(dense, labels, k), topk_correct(sparse, labels, k)
            out[f"top{k}_dense"], out[f"top{k}_sparse"] = float(cd.mean()), float(cs.mean())
            out[f"top{k}_drop"] = float(cd.mean() - cs.mean())
            if k == 1:
                # Paired standard error: the same images under both engines.
                delta = cd.astype(np.float64) - cs.astype(np.float64)
                out["top1_drop_stderr"] = float(delta.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return out


# ---------------------------------------------------------------------------------------------------
# per-layer sensitivity (PyTorch)


def layer_sensitivity(pruned_dir: Path, x, layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Logit effect of applying ONE layer's mask to the dense model, for every pruned layer.

    Effect = mean over samples of ||z - z_dense||_inf (same units as the certificate's d), plus the
    mean relative L2 change and the share of top-1 flips. `all_layers` applies every mask at once
    (the pruned function without restore / distillation), to compare with the sum of single effects.
    """
    import torch

    from mpdeploy.prune import load_pruned

    art = load_pruned(pruned_dir, which="dense", verify=False)
    model = art.model
    params = dict(model.named_parameters())
    x = torch.as_tensor(x)

    def effect(z, z0) -> dict[str, float]:
        linf = (z - z0).abs().amax(dim=1)
        rel = (z - z0).norm(dim=1) / z0.norm(dim=1).clamp_min(1e-12)
        return {"logit_effect": float(linf.mean()), "relative_l2": float(rel.mean()),
                "flips": float((z.argmax(1) != z0.argmax(1)).float().mean())}

    records = []
    with torch.no_grad():
        z0 = model(x).float()
        for layer in layers:
            param = layer.get("param")
            if not layer.get("pattern") or param not in art.masks or param not in params:
                continue
            weight = params[param]
            saved = weight.detach().clone()
            weight.mul_(art.masks[param].to(weight.dtype))
            z = model(x).float()
            weight.copy_(saved)
            records.append({"layer": layer["name"], "param": param, "pattern": layer["pattern"],
                            "signal": layer.get("signal"), "z": layer.get("z"), "macs": layer.get("macs"),
                            **effect(z, z0)})
        for param, mask in art.masks.items():
            if param in params:
                params[param].mul_(mask.to(params[param].dtype))
        joint = effect(model(x).float(), z0)
    signals = [(r["signal"], r["logit_effect"]) for r in records if r["signal"] is not None]
    rho = None
    if len(signals) >= 3 and np.ptp([s for s, _ in signals]) > 0 and np.ptp([e for _, e in signals]) > 0:
        from scipy.stats import spearmanr

        value = spearmanr([s for s, _ in signals], [e for _, e in signals]).statistic
        rho = None if value is None or not np.isfinite(value) else float(value)
    return {"images": int(x.shape[0]), "layers": records, "all_layers": joint,
            "sum_of_single_effects": float(sum(r["logit_effect"] for r in records)),
            "spearman_signal_vs_effect": rho}


def torch_reference(pruned_dir: Path, x) -> dict[str, np.ndarray]:
    """Logits of the pruned artifact's sparse and dense PyTorch models (what the engines should compute)."""
    import torch

    from mpdeploy.prune import load_pruned

    out = {}
    with torch.no_grad():
        for which in ("sparse", "dense"):
            out[which] = load_pruned(pruned_dir, which=which, verify=False).model(torch.as_tensor(x)).float().numpy()
    return out


# ---------------------------------------------------------------------------------------------------
# device and host


def host_info() -> dict[str, Any]:
    cpu = cpu_model()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg": _loadavg()}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _runtime_text(backend: str, runtime: Mapping[str, Any], host: Mapping[str, Any]) -> str:
    parts = [backend]
    for key in ("gpu", "providers_preferred", "provider", "providers", "device", "name"):
        if runtime.get(key):
            value = runtime[key]
            parts.append(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
            break
    parts.append(str(host.get("cpu")))
    return " / ".join(parts)


def _cpu_only(backend: str, runtime: Mapping[str, Any]) -> bool:
    text = " ".join(str(v) for v in runtime.values()).lower()
    return backend == "ort" and "cuda" not in text and "tensorrt" not in text


# ---------------------------------------------------------------------------------------------------
# the stage


def _fmt_pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _pattern_text(layers: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for layer in layers:
        if layer.get("pattern"):
            counts[layer["pattern"]] = counts.get(layer["pattern"], 0) + 1
    if not counts:
        return "none"
    return " + ".join(f"{p} ({n})" if len(counts) > 1 else p for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def audit(engine_root: Path, config: AuditConfig, progress: Progress | None = None) -> Path:
    """Audit `engine_root/engine-<backend>/` (sparse vs dense) and write `engine_root/audit/`. Returns its path."""
    from mpdeploy.data import load_images

    engine_root = Path(engine_root)
    _check_root(engine_root)
    step = progress or (lambda stage, done, total: None)
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
    # verify=False: the engine manifest's `files` maps variants to file names (not hashes); the engine
    # files are checked against `file_sha256` where the manifest has it.
    manifest = artifacts.read_manifest(engine_dir, "engine", verify=False)
    files = _engine_files(engine_dir, manifest)
    pruned_dir = engine_root / "pruned"
    pruned = _read_optional_manifest(pruned_dir, "pruned")
    layers = list((pruned or {}).get("layers") or [])
    chw, fixed_batch, classes, data_config = _io_spec(manifest, pruned)
    precision = manifest.get("precision")

    failures: list[str] = []
    warnings: list[str] = []
    if pruned is None:
        warnings.append("no pruned/ artifact beside the engine: per-layer sensitivity, MP signals and the "
                        "weight check against the pruned masks are skipped")

    # --- data
    data = load_images(config.data, chw, split="test", data_config=data_config,
                       limit=config.max_eval_images or (256 if config.data == "synthetic" else None), seed=config.seed)
    if len(data) == 0:
        raise MpdeployError(f"evaluation data {config.data!r} holds no images; pass --data DIR|digits|synthetic")
    if data.synthetic:
        warnings.append("synthetic N(0,1) inputs: accuracy numbers describe noise, not images; use --data DIR")

    lap("read_inputs_s")
    # --- engines
    backend = backends.create_backend(backend_name)
    load_config = backends.BuildConfig(precision=precision if precision in backends.PRECISIONS else None,
                                       batch_sizes=config.batch_sizes)
    runners = {}
    try:
        for variant in ("dense", "sparse"):
            runners[variant] = backend.load(files[variant], load_config)
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
                runners, image_batches(data.dataset, eval_batch), fixed_batch, classes, keep,
                total=math.ceil(len(data) / eval_batch), progress=step)
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
        if logits is not None:
            num_outputs = logits["dense"].shape[1]
            dense_top1 = float((logits["dense"].argmax(1) == y_all).mean()) if data.num_classes else None
            labels_ok, labels_why = labels_fit(data.kind, data.num_classes, num_outputs, dense_top1, len(y_all))
            accuracy = accuracy_metrics(logits["dense"], logits["sparse"], y_all if labels_ok else None)
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
        load_before = _loadavg()
        latency_raw: dict[int, dict[str, Any]] = {}
        for b, xb in inputs.items():
            try:
                latency_raw.update(measure_latency(runners, {b: xb}, config.warmup, config.repeats,
                                                   config.calls_per_round, None))
            except Exception as exc:  # an engine outside its optimization profile: report, keep going
                logger.warning("batch %d could not be timed: %s", b, exc)
                failures.append(f"batch {b}: an engine failed to run ({type(exc).__name__}: {str(exc)[:160]})")
            step("latency", len(latency_raw), len(inputs))
        load_after = _loadavg()

        lap("latency_s")
        # --- engine vs PyTorch reference (same images)
        reference = None
        if pruned is not None and logits is not None:
            n_ref = min(len(x_head), max(config.sensitivity_batch, 8))
            try:
                ref = torch_reference(pruned_dir, x_head[:n_ref])
                reference = {}
                for which in ("sparse", "dense"):
                    err = float(np.abs(ref[which] - logits[which][:n_ref]).max())
                    scale = float(np.abs(ref[which]).max()) or 1.0
                    reference[which] = {"max_abs_diff": err, "relative": err / scale}
                reference["images"] = n_ref
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
                warnings.append(f"the {which} engine differs from the pruned artifact's PyTorch model by "
                                f"{reference[which]['max_abs_diff']:.3g} (relative {reference[which]['relative']:.2g}) "
                                "at fp32: it may not have been built from this pruned/ artifact")

    lap("pytorch_reference_s")
    # --- weights
    weights: dict[str, Any] | None = None
    onnx_path, onnx_note = _onnx_for_weights(engine_root, files["sparse"])
    if onnx_path is not None and pruned is not None:
        from safetensors.numpy import load_file

        masks = {k: v.astype(bool) for k, v in load_file(str(pruned_dir / "masks.safetensors")).items()}
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
    if pruned is not None and config.sensitivity_batch > 0:
        step("sensitivity", 0, 1)
        sensitivity = layer_sensitivity(pruned_dir, x_head[: config.sensitivity_batch], layers)
        step("sensitivity", 1, 1)

    lap("sensitivity_s")
    # --- gates
    if accuracy is not None:
        if labels_ok:
            gate = {"metric": "top1_drop", "value": accuracy["top1_drop"], "max": config.max_top1_drop}
            if accuracy["top1_drop"] > config.max_top1_drop + 1e-12:
                failures.append(f"top-1 drop {100 * accuracy['top1_drop']:.2f} pts > {100 * config.max_top1_drop:.2f} "
                                f"pts ({_fmt_pct(accuracy['top1_dense'], 2)} -> {_fmt_pct(accuracy['top1_sparse'], 2)})")
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
    if _cpu_only(backend_name, runtime):
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
            and not _cpu_only(backend_name, runtime):
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
        "pattern": _pattern_text(layers),
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
    with artifacts.atomic_dir(out) as tmp:
        plots = []
        if config.plots:
            step("plots", 0, 1)
            plots = write_plots(result, logits, tmp)
            step("plots", 1, 1)
        result["plots"] = plots
        lap("plots_s")
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        artifacts.write_json(tmp / "audit.json", result)
        artifacts.atomic_write_text(tmp / "audit.md", render_markdown(result, engine_root))
        inputs_hashes = {"engine_manifest": engine_manifest_sha}
        if pruned is not None:
            inputs_hashes["pruned_manifest"] = artifacts.manifest_hash(pruned_dir)
        artifacts.write_manifest(tmp, KIND, config, inputs=inputs_hashes,
                                 extra={"backend": backend_name, "passed": not failures})
    logger.info("audit of %s: %s -> %s", engine_root, "PASS" if not failures else "FAIL", out)
    return out


def read_audit(engine_root: Path) -> dict[str, Any]:
    path = Path(engine_root) / AUDIT_DIR / "audit.json"
    data = artifacts.read_json(path, what="audit")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise MpdeployError(f"{path} is not a {SCHEMA} audit; re-run mpdeploy audit {engine_root}")
    return data


def verdict_line(result: Mapping[str, Any], path: Path | str) -> str:
    """One line for the terminal: PASS/FAIL, the headline numbers, the path."""
    s = result["summary"]
    parts = ["PASS" if result["passed"] else "FAIL", str(path)]
    if s.get("top1_dense") is not None:
        parts.append(f"top-1 {_fmt_pct(s['top1_dense'], 2)} -> {_fmt_pct(s['top1_sparse'], 2)}")
    if s.get("agreement") is not None:
        parts.append(f"agreement {_fmt_pct(s['agreement'])}, certified {_fmt_pct(s['certified_fraction'])}")
    if s.get("speedup_p50"):
        parts.append("speedup " + " ".join(f"b{b} {v:.2f}x" for b, v in s["speedup_p50"].items()))
    parts.append(f"on {result['backend']}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------
# plots


def _figure(width: float, height: float, **margins: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MpdeployError("plots need matplotlib: pip install matplotlib, or pass --no-plots") from None
    fig = Figure(figsize=(width, height), dpi=100)  # Agg, no pyplot global state
    fig.subplots_adjust(**margins)
    return fig


def write_plots(result: Mapping[str, Any], logits: Mapping[str, np.ndarray] | None, folder: Path) -> list[str]:
    written = []
    if result["latency"]:
        _plot_latency(result, folder / "latency.png")
        written.append("latency.png")
    if result["accuracy"] is not None:
        _plot_accuracy(result, folder / "accuracy.png")
        written.append("accuracy.png")
        if logits is not None and logits["dense"].shape[1] >= 2:
            _plot_certified(logits, folder / "certified.png")
            written.append("certified.png")
    if result["sensitivity"]:
        _plot_sensitivity(result, folder / "sensitivity.png")
        written.append("sensitivity.png")
    return written


def _plot_latency(result: Mapping[str, Any], path: Path) -> None:
    lat = result["latency"]
    batches = list(lat)
    xs = np.arange(len(batches))
    fig = _figure(10, 4.2, left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.25)
    left, right = fig.subplots(1, 2)
    width = 0.38
    for offset, name, color in ((-width / 2, "dense", "tab:gray"), (width / 2, "sparse", "tab:blue")):
        p50 = np.array([lat[b][name]["p50"] for b in batches])
        lo = p50 - np.array([lat[b][name]["p10"] for b in batches])
        hi = np.array([lat[b][name]["p90"] for b in batches]) - p50
        left.bar(xs + offset, p50, width, color=color, label=f"{name} p50", yerr=[lo, hi], capsize=4)
    left.set_xticks(xs, [f"batch {b}" for b in batches])
    left.set_ylabel("ms per call (p50, bars: p10-p90)")
    left.set_yscale("log")
    left.set_title("latency per call")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3, which="both")
    med = np.array([lat[b]["ratio_p50"] for b in batches])
    p10 = np.array([lat[b]["ratio_spread"]["p10"] for b in batches])
    p90 = np.array([lat[b]["ratio_spread"]["p90"] for b in batches])
    right.errorbar(xs, med, yerr=[np.maximum(med - p10, 0), np.maximum(p90 - med, 0)], fmt="o", color="tab:blue",
                   capsize=5, label="dense p50 / sparse p50 (bars: p10-p90 of rounds)")
    for i, v in enumerate(med):
        right.annotate(f"{v:.2f}x", (xs[i], v), textcoords="offset points", xytext=(8, 4), fontsize=9)
    right.axhline(1.0, color="black", lw=1, ls="--", label="no speedup")
    gate = result["thresholds"]["min_speedup"]
    if gate is not None:
        right.axhline(gate, color="tab:red", lw=1, ls=":", label=f"gate {gate:g}x")
    right.set_xticks(xs, [f"batch {b}" for b in batches])
    right.set_xlim(-0.5, len(batches) - 0.5)
    right.set_ylabel("speedup (>1: sparse faster)")
    right.set_title("sparse speedup")
    right.legend(fontsize=8, loc="best")
    right.grid(axis="y", alpha=0.3)
    dev = _runtime_text(result["backend"], result["device"]["runtime"], result["device"]["host"])
    fig.suptitle(f"{result['summary']['model']}: dense vs sparse on {dev}", fontsize=10)
    fig.savefig(path)


def _plot_accuracy(result: Mapping[str, Any], path: Path) -> None:
    acc = result["accuracy"]
    fig = _figure(8, 4.2, left=0.09, right=0.98, bottom=0.14, top=0.88)
    ax = fig.add_subplot()
    names, dense, sparse = [], [], []
    for k in (1, 5):
        if acc.get(f"top{k}_dense") is not None:
            names.append(f"top-{k}")
            dense.append(100 * acc[f"top{k}_dense"])
            sparse.append(100 * acc[f"top{k}_sparse"])
    xs = np.arange(len(names))
    if names:
        ax.bar(xs - 0.19, dense, 0.38, color="tab:gray", label="dense engine")
        ax.bar(xs + 0.19, sparse, 0.38, color="tab:blue", label="sparse engine")
        for x, d, s in zip(xs, dense, sparse):
            ax.annotate(f"{d:.1f}%", (x - 0.19, d), ha="center", va="bottom", fontsize=8)
            ax.annotate(f"{s:.1f}%", (x + 0.19, s), ha="center", va="bottom", fontsize=8)
    extra = [("agreement\nwith dense", 100 * acc["agreement"], "tab:green"),
             ("certified\n(m > 2d)", 100 * acc["certified_fraction"], "tab:olive")]
    for i, (label, value, color) in enumerate(extra):
        x = len(names) + i
        ax.bar(x, value, 0.5, color=color)
        ax.annotate(f"{value:.1f}%", (x, value), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(names) + len(extra)), names + [e[0] for e in extra])
    ax.set_xlim(-0.7, len(names) + len(extra) - 0.3)
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of evaluation images")
    note = "" if acc.get("labels_meaningful") else "\nlabels do not fit the model: no top-k, agreement is the gate"
    ax.set_title(f"accuracy on {acc['images']} {result['data']['kind']} images{note}", fontsize=10)
    if names:
        ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _log_axis_labels(axis) -> None:
    """Major ticks only: minor-tick labels of log axes collide."""
    from matplotlib.ticker import NullFormatter

    axis.set_minor_formatter(NullFormatter())


def _plot_certified(logits: Mapping[str, np.ndarray], path: Path) -> None:
    margins = dense_margins(logits["dense"])
    two_d = 2 * logit_distance(logits["dense"], logits["sparse"])
    floor = 1e-6
    m, t = np.maximum(margins, floor), np.maximum(two_d, floor)
    certified = margins > two_d
    fig = _figure(10, 4.2, left=0.07, right=0.98, bottom=0.13, top=0.86, wspace=0.25)
    left, right = fig.subplots(1, 2)
    lo = min(m.min(), t.min())
    hi = max(m.max(), t.max())
    bins = np.logspace(np.log10(lo), np.log10(hi * 1.01), 40)
    left.hist(m, bins=bins, color="tab:gray", alpha=0.7, label="dense margin m = z1 - z2")
    left.hist(t, bins=bins, color="tab:red", alpha=0.6, label="2d = 2 ||z_sparse - z_dense||_inf")
    left.set_xscale("log")
    _log_axis_labels(left.xaxis)
    left.set_xlabel(f"logit units (log scale; values below {floor:g} shown at {floor:g})")
    left.set_ylabel("images")
    left.legend(fontsize=8)
    left.set_title("margins vs perturbations")
    right.scatter(m[certified], t[certified], s=8, color="tab:green", label=f"certified ({certified.sum()})")
    right.scatter(m[~certified], t[~certified], s=12, color="tab:red", marker="x",
                  label=f"not certified ({(~certified).sum()})")
    line = np.array([lo, hi])
    right.plot(line, line, color="black", lw=1, ls="--", label="m = 2d")
    right.set_xscale("log")
    right.set_yscale("log")
    _log_axis_labels(right.xaxis)
    _log_axis_labels(right.yaxis)
    right.set_xlabel("dense margin m")
    right.set_ylabel("2d")
    right.legend(fontsize=8, loc="best")
    right.set_title("per image: certified when below the line")
    fig.suptitle(f"certified fraction {certified.mean():.1%}: sparse top-1 provably equals dense top-1", fontsize=10)
    fig.savefig(path)


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-4:]) if len(parts) > 4 else name


def _plot_sensitivity(result: Mapping[str, Any], path: Path) -> None:
    recs = result["sensitivity"]
    fig = _figure(9, 5, left=0.12, right=0.98, bottom=0.11, top=0.9)
    ax = fig.add_subplot()
    with_signal = [r for r in recs if r["signal"] is not None]
    positive = [r["logit_effect"] for r in with_signal if r["logit_effect"] > 0]
    # Exactly-zero effects (a layer whose output is multiplied by zero downstream) sit on a floor
    # one decade below the smallest real effect instead of stretching the log axis.
    floor = min(positive) / 10 if positive else 1e-6
    patterns = sorted({r["pattern"] for r in with_signal})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for i, p in enumerate(patterns):
        pts = [r for r in with_signal if r["pattern"] == p]
        nonzero = [r for r in pts if r["logit_effect"] > 0]
        zero = [r for r in pts if r["logit_effect"] <= 0]
        ax.scatter([r["signal"] for r in nonzero], [r["logit_effect"] for r in nonzero], s=28,
                   color=colors[i % len(colors)], label=f"{p} ({len(pts)} layers)")
        if zero:
            ax.scatter([r["signal"] for r in zero], [floor] * len(zero), s=28, marker="v",
                       color=colors[i % len(colors)], label=f"{p}: effect exactly 0 ({len(zero)}), drawn at floor")
    # Label the outliers: the largest effects and the points furthest from a log-linear trend.
    if positive:
        pts = [r for r in with_signal if r["logit_effect"] > 0]
        sig = np.array([r["signal"] for r in pts])
        eff = np.log10([r["logit_effect"] for r in pts])
        resid = eff - np.polyval(np.polyfit(sig, eff, 1), sig) if len(sig) >= 3 and np.ptp(sig) > 0 else eff
        picks = list(dict.fromkeys([*np.argsort(-eff)[:3], *np.argsort(-np.abs(resid))[:2]]))
        for j, i in enumerate(picks):
            r = pts[i]
            ax.annotate(_short(r["layer"]), (r["signal"], r["logit_effect"]), fontsize=8,
                        textcoords="offset points", xytext=(6, 6 - 9 * (j % 3)),
                        arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.5})
    ax.set_yscale("log")
    ax.set_xlabel("MP signal: bulk fraction of the layer's weight (higher = more noise-like = safer to prune)")
    ax.set_ylabel("logit effect of this layer alone\nmean ||z - z_dense||_inf")
    sens = result["sensitivity_summary"]
    rho = sens.get("spearman_signal_vs_effect")
    rho_text = "n/a" if rho is None else f"{rho:+.2f}"
    ax.set_title(f"per-layer sensitivity on {sens['images']} images; Spearman(signal, effect) = {rho_text}; "
                 f"all layers together {sens['all_layers']['logit_effect']:.3g}", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------------
# the Markdown report


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _compact(info: Mapping[str, Any]) -> str:
    """key: value pairs for a table cell; long notes and nested records stay in audit.json."""
    parts = []
    for k, v in info.items():
        if v is None or isinstance(v, Mapping) or k in ("note", "fingerprint"):
            continue
        text = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        if len(text) <= 80:
            parts.append(f"{k}: {text}")
    return "; ".join(parts) or "n/a"


def render_markdown(result: Mapping[str, Any], engine_root: Path) -> str:
    s, acc, lat = result["summary"], result["accuracy"], result["latency"]
    dev = result["device"]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines = [f"# Audit of `{engine_root.name}`: **{verdict}**", ""]
    lines.append(
        f"Sparse engine ({s['pattern']}, budget {s['budget']}, saliency {s['saliency']}) against its dense twin, "
        f"both on **{_runtime_text(result['backend'], dev['runtime'], dev['host'])}**, "
        f"{result['data']['images']} {result['data']['kind']} images."
    )
    lines.append("")
    if acc is not None:
        if acc.get("top1_dense") is not None:
            err = f" ± {100 * acc['top1_drop_stderr']:.2f}" if acc.get("top1_drop_stderr") is not None else ""
            lines.append(f"- **Top-1**: dense {_fmt_pct(acc['top1_dense'], 2)} -> sparse {_fmt_pct(acc['top1_sparse'], 2)} "
                         f"(drop {100 * acc['top1_drop']:.2f}{err} pts; gate: at most "
                         f"{100 * result['thresholds']['max_top1_drop']:.2f} pts)")
        else:
            lines.append(f"- **Top-1**: not measured: {acc.get('labels_note')}; gate: top-1 disagreement with dense at "
                         f"most {100 * result['thresholds']['max_top1_drop']:.2f} pts")
        lines.append(f"- **Agreement with dense**: {_fmt_pct(acc['agreement'], 2)} ({acc['disagreements']} of "
                     f"{acc['images']} images change their top-1); **certified**: {_fmt_pct(acc['certified_fraction'], 1)}")
    if lat:
        speed = ", ".join(f"batch {b}: {v['ratio_p50']:.2f}x" for b, v in lat.items())
        gate = result["thresholds"]["min_speedup"]
        lines.append(f"- **Speedup** (dense p50 / sparse p50): {speed} "
                     f"({'gate: at least ' + format(gate, 'g') + 'x at the largest batch' if gate else 'no speed gate'})")
    if s.get("mac_reduction") is not None:
        lines.append(f"- **MAC reduction**: {_fmt_pct(s['mac_reduction'])} (runs sparse on 2:4 hardware: "
                     f"{_fmt_pct(s['sparse_execution_mac_reduction'])})")
    lines.append("")
    if result["failures"]:
        lines += ["**Failures:**", ""] + [f"- {f}" for f in result["failures"]] + [""]
    plots = set(result.get("plots") or [])

    lines += ["## What was measured, where", "", "| | |", "|---|---|"]
    host = dev["host"]
    rows = [
        ("engine folder", f"`{result['engine']['folder']}/` ({result['engine']['files']['sparse']}, "
                          f"{result['engine']['files']['dense']}), precision {result['engine']['precision']}"),
        ("backend", result["backend"]),
        ("runtime", _compact(dev["runtime"])),
        ("built for", _compact(dev["engine_manifest"] or {})),
        ("host", f"{host['cpu']}, {host['cpu_count']} cores, {host['platform']}"),
        ("load average", f"before timing {dev['loadavg_before_timing']}, after {dev['loadavg_after_timing']}"),
        ("data", f"{result['data']['description']}; labels: {result['data']['labels_note']}"),
        ("timing", f"{result['latency_method']['warmup_calls']} warm-up calls per engine and batch, then "
                   f"{result['latency_method']['rounds']} interleaved rounds x "
                   f"{result['latency_method']['calls_per_round']} calls (dense first in even rounds, sparse first "
                   f"in odd)"),
        ("when", f"{result['started']} ({result['seconds']} s)"),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows] + [""]

    if lat:
        lines += ["## Latency", "",
                  "| batch | dense p50 / p90 / p99 ms | sparse p50 / p90 / p99 ms | dense img/s | sparse img/s | "
                  "speedup p50 | per-round p10-p90 |",
                  "|---:|---|---|---:|---:|---:|---|"]
        for b, v in lat.items():
            d, sp, r = v["dense"], v["sparse"], v["ratio_spread"]
            lines.append(f"| {b} | {_ms(d['p50'])} / {_ms(d['p90'])} / {_ms(d['p99'])} | {_ms(sp['p50'])} / "
                         f"{_ms(sp['p90'])} / {_ms(sp['p99'])} | {d['throughput_img_s']:.0f} | "
                         f"{sp['throughput_img_s']:.0f} | **{v['ratio_p50']:.3f}x** | {r['p10']:.3f}-{r['p90']:.3f} |")
        lines += ["", f"Each p-value is over {next(iter(lat.values()))['dense']['samples']} calls; throughput is "
                  "batch / mean call time; speedup > 1 means the sparse engine is faster.", ""]
        if "latency.png" in plots:
            lines += ["![latency: dense vs sparse per batch size](latency.png)", ""]

    if acc is not None:
        lines += ["## Accuracy", "", "| metric | dense | sparse | difference |", "|---|---:|---:|---:|"]
        for k in (1, 5):
            if acc.get(f"top{k}_dense") is not None:
                lines.append(f"| top-{k} | {_fmt_pct(acc[f'top{k}_dense'], 2)} | {_fmt_pct(acc[f'top{k}_sparse'], 2)} | "
                             f"{-100 * acc[f'top{k}_drop']:+.2f} pts |")
        lines.append(f"| top-1 agreement with dense | | {_fmt_pct(acc['agreement'], 2)} | {acc['disagreements']} images differ |")
        lines.append(f"| certified (m > 2d) | | {_fmt_pct(acc['certified_fraction'], 2)} | {acc['certified']} of {acc['images']} |")
        lines.append(f"| logit error max / mean abs | | {acc['max_logit_error']:.4g} / {acc['mean_logit_error']:.4g} | "
                     f"dense mean abs logit {acc['dense_logit_scale']:.3g} |")
        lines.append("")
        if "accuracy.png" in plots:
            lines += ["![accuracy and agreement](accuracy.png)", ""]
        lines += ["### Certified fraction", "",
                  "For each image, m is the dense engine's top-1 margin (largest minus second-largest logit) and "
                  "d = max |z_sparse - z_dense| over the logits. A perturbation of size d can shrink the margin by at "
                  "most 2d, so an image with m > 2d provably keeps its dense prediction. The certified fraction is a "
                  "lower bound on agreement that does not depend on labels. Median margin "
                  f"{acc['margin_quantiles']['p50']:.3g}, median d {acc['perturbation_quantiles']['p50']:.3g}.", ""]
        if "certified.png" in plots:
            lines += ["![certified fraction: margins vs perturbations](certified.png)", ""]

    ref = result.get("engine_vs_pytorch")
    if ref:
        lines += ["### Engines vs the pruned PyTorch model", "",
                  f"On {ref['images']} images: sparse engine max |diff| {ref['sparse']['max_abs_diff']:.3g} "
                  f"(relative {ref['sparse']['relative']:.2g}), dense engine {ref['dense']['max_abs_diff']:.3g} "
                  f"(relative {ref['dense']['relative']:.2g}). Small values mean the engines compute the pruned "
                  "artifact's functions; reduced precision (fp16/int8) legitimately raises them.", ""]

    sens = result.get("sensitivity_summary")
    if sens and result["sensitivity"]:
        lines += ["## Per-layer sensitivity", "",
                  f"The dense model in PyTorch with only one layer's mask applied, on {sens['images']} images. "
                  "Effect = mean over images of max |z - z_dense| (the certificate's d, for that layer alone); "
                  "relative L2 = mean ||z - z_dense|| / ||z_dense||; flips = share of images whose top-1 changes. "
                  "The MP signal is the layer's bulk fraction from the pruned manifest (higher = more noise-like, "
                  "expected to be safer to prune; a negative Spearman correlation means the signal ranks layers "
                  "the way the logits do). "
                  f"Spearman(signal, effect) = {'n/a' if sens['spearman_signal_vs_effect'] is None else format(sens['spearman_signal_vs_effect'], '+.2f')}; "
                  f"all masks together: effect {sens['all_layers']['logit_effect']:.3g}, flips "
                  f"{_fmt_pct(sens['all_layers']['flips'])} (sum of single effects {sens['sum_of_single_effects']:.3g}).",
                  "", "| layer | pattern | MP signal | z | effect | relative L2 | flips |", "|---|---|---:|---:|---:|---:|---:|"]
        ranked = sorted(result["sensitivity"], key=lambda r: -r["logit_effect"])
        for r in ranked[:12]:
            sig = "n/a" if r["signal"] is None else f"{r['signal']:.3f}"
            # The uniform budget standardizes nothing: its z of 0 would read as "average".
            z = "n/a" if r["z"] is None or s.get("budget") != "mp" else f"{r['z']:+.2f}"
            lines.append(f"| `{r['layer']}` | {r['pattern']} | {sig} | {z} | {r['logit_effect']:.3g} | "
                         f"{r['relative_l2']:.3g} | {_fmt_pct(r['flips'])} |")
        if len(ranked) > 12:
            lines.append(f"| ... {len(ranked) - 12} more in audit.json | | | | | | |")
        lines.append("")
        if "sensitivity.png" in plots:
            lines += ["![per-layer sensitivity vs MP signal](sensitivity.png)", ""]

    w = result.get("weights")
    lines += ["## Sparse weights in the engine", ""]
    if w:
        lines.append(f"Checked {w['checked']} pruned layers in `{Path(w['source']).name}` ({w['note']}): "
                     f"{w['ok']} are N:M along their reduction axis"
                     f"{', every 2:4 layer also 2:4' if not w['violations'] else ''}. By TensorRT's placement "
                     f"rules, {w['trt_rules']['eligible_and_2_4']} of {w['trt_rules']['weights_seen']} Conv/MatMul/Gemm "
                     "weights are eligible for sparse math and 2:4.")
        for v in w["violations"][:10]:
            lines.append(f"- `{v['layer']}` ({v['pattern']}): {v['problem']}")
    else:
        lines.append("Not checked (see caveats).")
    lines.append("")
    if result["warnings"]:
        lines += ["## Caveats", ""] + [f"- {x}" for x in result["warnings"]] + [""]
    t = result["thresholds"]
    lines += ["## Thresholds", "",
              f"- accuracy gate: {t['accuracy_gate']['metric']} at most {100 * t['max_top1_drop']:.2f} pts "
              "(top-1 drop when the labels fit the model, else top-1 disagreement with dense)",
              f"- speed gate: {'none' if t['min_speedup'] is None else format(t['min_speedup'], 'g') + 'x dense p50 / sparse p50 at the largest batch'}",
              "- always: every pruned layer N:M in the engine weights; outputs of the right shape, finite",
              "", "Machine-readable: `audit.json` (schema mpdeploy.audit/1).", ""]
    return "\n".join(lines)
