"""Running both engines over the evaluation data; per-layer sensitivity in PyTorch."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


from mpdeploy.audit.common import Progress
from mpdeploy.audit.metrics import dense_margins, topk_correct

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# running the engines


def eval_workers(dataset, wanted: int | None) -> int:
    """DataLoader workers: `wanted`, or (None) a few for decoded-from-disk data and none for in-memory tensors."""
    import torch

    if wanted is not None:
        return max(0, int(wanted))
    base = getattr(dataset, "dataset", dataset)  # through a Subset
    if isinstance(base, torch.utils.data.TensorDataset):
        return 0  # already in memory: workers would only copy it
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def image_batches(dataset, batch: int, num_workers: int = 0, seed: int | None = 0,
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 images, labels), streamed, so a large ImageFolder never sits in memory (each worker holds
    at most two decoded batches). With a seed, in a seeded random order: an ImageFolder lists its images
    class by class, and an evaluation cut short by the time budget must still be a fair sample."""
    import torch

    extra = {"prefetch_factor": 2, "persistent_workers": False} if num_workers > 0 else {}
    order = {} if seed is None else {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
    for xb, yb in torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=num_workers, **order,
                                              **extra):
        yield np.ascontiguousarray(xb.numpy().astype(np.float32)), yb.numpy()


def _pad(x: np.ndarray, fixed: int | None) -> np.ndarray:
    """A fixed-batch engine gets a short last batch padded with copies of its last image."""
    if fixed and len(x) < fixed:
        x = np.concatenate([x, np.repeat(x[-1:], fixed - len(x), axis=0)])
    return np.ascontiguousarray(x)


class StreamedAccuracy:
    """What the accuracy metrics need, accumulated batch by batch: per image a few numbers (predictions,
    margin, distance, top-k hits), over all logits running sums; the full logits are kept only for the
    first `keep_logits` images (the PyTorch reference check). 50,000 images x 1,000 classes would be
    200 MB of logits per engine; this keeps about 30 bytes per image."""

    def __init__(self, keep_logits: int = 0) -> None:
        self.keep_logits = keep_logits
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in (
            "pred_dense", "pred_sparse", "margin", "distance", "top1_dense", "top1_sparse", "top5_dense", "top5_sparse")}
        self.head: dict[str, list[np.ndarray]] = {"dense": [], "sparse": []}
        self.kept = 0
        self.count = 0
        self.stopped = "all images"  # or "time budget"
        self.classes: int | None = None
        self.abs_err_sum = 0.0
        self.abs_dense_sum = 0.0
        self.max_err = 0.0

    def update(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> None:
        dense64, sparse64 = np.asarray(dense, np.float64), np.asarray(sparse, np.float64)
        n, classes = dense64.shape
        self.classes = classes
        diff = np.abs(sparse64 - dense64)
        self.abs_err_sum += float(diff.sum())
        self.abs_dense_sum += float(np.abs(dense64).sum())
        self.max_err = max(self.max_err, float(diff.max()) if diff.size else 0.0)
        labels = np.asarray(labels)
        p = self.parts
        p["pred_dense"].append(dense64.argmax(1).astype(np.int32))
        p["pred_sparse"].append(sparse64.argmax(1).astype(np.int32))
        p["margin"].append(dense_margins(dense64) if classes >= 2 else np.full(n, np.inf))
        p["distance"].append(diff.max(axis=1))
        for k in (1, 5):
            if classes >= k:
                p[f"top{k}_dense"].append(topk_correct(dense64, labels, k))
                p[f"top{k}_sparse"].append(topk_correct(sparse64, labels, k))
        if self.kept < self.keep_logits:
            take = min(n, self.keep_logits - self.kept)
            self.head["dense"].append(np.asarray(dense[:take], np.float32))
            self.head["sparse"].append(np.asarray(sparse[:take], np.float32))
            self.kept += take
        self.count += n

    def array(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key]) if self.parts[key] else np.zeros(0)

    def head_logits(self, which: str) -> np.ndarray:
        return np.concatenate(self.head[which]) if self.head[which] else np.zeros((0, self.classes or 0), np.float32)

    def dense_top1(self) -> float | None:
        hits = self.array("top1_dense")
        return float(hits.mean()) if hits.size else None

    def samples(self) -> dict[str, np.ndarray]:
        """Per image: the dense margin m and the logit distance d (what the certificate plot needs)."""
        return {"margin": self.array("margin"), "distance": self.array("distance")}

    def metrics(self, labels_meaningful: bool) -> dict[str, Any]:
        """Everything the audit reports about accuracy (same keys as `accuracy_metrics`)."""
        n, classes = self.count, self.classes or 0
        pred_d, pred_s = self.array("pred_dense"), self.array("pred_sparse")
        margins, d = self.array("margin"), self.array("distance")
        certified = margins > 2 * d
        entries = max(n * classes, 1)
        out: dict[str, Any] = {
            "images": int(n),
            "classes": int(classes),
            "agreement": float((pred_d == pred_s).mean()),
            "disagreements": int((pred_d != pred_s).sum()),
            "certified_fraction": float(certified.mean()),
            "certified": int(certified.sum()),
            "max_logit_error": self.max_err,
            "mean_logit_error": self.abs_err_sum / entries,
            "mean_linf_error": float(d.mean()),
            "dense_logit_scale": self.abs_dense_sum / entries,
            "margin_quantiles": dict(zip(("p10", "p50", "p90"), map(float, np.percentile(margins, [10, 50, 90])))),
            "perturbation_quantiles": dict(zip(("p10", "p50", "p90"), map(float, np.percentile(d, [10, 50, 90])))),
        }
        for k in (1, 5):
            for key in (f"top{k}_dense", f"top{k}_sparse", f"top{k}_drop"):
                out[key] = None
        out["top1_drop_stderr"] = None
        if labels_meaningful:
            for k in (1, 5) if classes >= 5 else (1,):
                cd, cs = self.array(f"top{k}_dense"), self.array(f"top{k}_sparse")
                out[f"top{k}_dense"], out[f"top{k}_sparse"] = float(cd.mean()), float(cs.mean())
                out[f"top{k}_drop"] = float(cd.mean() - cs.mean())
                if k == 1:
                    # Paired standard error: the same images under both engines.
                    delta = cd.astype(np.float64) - cs.astype(np.float64)
                    out["top1_drop_stderr"] = float(delta.std(ddof=1) / math.sqrt(n)) if n > 1 else None
        return out


def _check_outputs(got: Mapping[str, np.ndarray], chunk: int, classes: int | None, valid: int, seen: int) -> list[str]:
    failures = []
    want = (chunk, classes) if classes else None
    for name, out in got.items():
        if out.ndim != 2 or out.shape[0] != chunk or (want and out.shape != want):
            failures.append(f"{name} engine output has shape {list(out.shape)} for a batch of {chunk}, "
                            f"expected {list(want) if want else [chunk, 'classes']}")
    if not failures and got["dense"].shape != got["sparse"].shape:
        failures.append(f"sparse engine output shape {list(got['sparse'].shape)} differs from the dense "
                        f"engine's {list(got['dense'].shape)}")
    for name, out in got.items():
        if not failures and not np.all(np.isfinite(out[:valid])):
            failures.append(f"{name} engine output holds NaN or Inf (images {seen}..{seen + valid - 1})")
    return failures


def run_both(runners: Mapping[str, Any], batches: Iterable[tuple[np.ndarray, np.ndarray]], fixed: int | None,
             classes: int | None, keep: int, total: int | None = None, progress: Progress | None = None,
             budget_s: float | None = None, clock=time.perf_counter,
             ) -> tuple[StreamedAccuracy | None, np.ndarray, np.ndarray, list[str]]:
    """Both engines over the evaluation batches, streamed (memory does not grow with the logits).

    Returns (the accumulated accuracy or None when an output has the wrong shape or NaN/Inf, labels,
    the first `keep` images (for timing, the PyTorch reference and the sensitivity map), failures).
    The accumulator keeps the first `keep` images' logits too. With `budget_s`, stops after the batch
    that spends it (once `keep` images are in), setting `stopped` to "time budget".
    """
    stream = StreamedAccuracy(keep_logits=keep)
    labels: list[np.ndarray] = []
    head: list[np.ndarray] = []
    kept = 0
    failures: list[str] = []
    seen = 0
    start = clock()
    if progress and total:
        progress("accuracy", 0, total)
    for i, (x, y) in enumerate(batches):
        if budget_s is not None and kept >= keep and clock() - start >= budget_s:
            stream.stopped = "time budget"
            break
        if kept < keep:
            head.append(x[: keep - kept])
            kept += len(head[-1])
        valid = len(x)
        chunk = _pad(x, fixed)
        got = {name: np.asarray(runners[name].run(chunk)) for name in ("dense", "sparse")}
        failures += _check_outputs(got, len(chunk), classes, valid, seen)
        labels.append(np.asarray(y))
        if failures:
            break
        stream.update(got["dense"][:valid], got["sparse"][:valid], labels[-1])
        seen += valid
        if progress:
            progress("accuracy", i + 1, total or i + 1)
    images = np.concatenate(head) if head else np.zeros((0,), np.float32)
    label_arr = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    return (None if failures else stream), label_arr, images, failures


def accuracy_metrics(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Everything the audit reports about accuracy, from the two logit arrays (and labels, if they fit)."""
    stream = StreamedAccuracy()
    stream.update(dense, sparse, labels if labels is not None else np.zeros(len(dense), np.int64))
    return stream.metrics(labels is not None)


# ---------------------------------------------------------------------------------------------------
# per-layer sensitivity (PyTorch)


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread over the whole range (bit-reversal): stopping early
    (layer cap, time budget) still samples early, middle and late layers alike."""
    if n <= 1:
        return list(range(n))
    bits = (n - 1).bit_length()
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def layer_sensitivity(pruned_dir: Path, x, layers: Sequence[Mapping[str, Any]], max_layers: int | None = None,
                      budget_s: float | None = None, progress: Progress | None = None,
                      clock=time.perf_counter) -> dict[str, Any]:
    """Logit effect of applying ONE layer's mask to the dense model, for every pruned layer (or a spread
    subset: at most `max_layers`, stopping when `budget_s` is spent).

    Effect = mean over samples of ||z - z_dense||_inf (same units as the certificate's d), plus the
    mean relative L2 change and the share of top-1 flips. `all_layers` applies every mask at once
    (the pruned function without restore / distillation), to compare with the sum of single effects.
    Cost: one forward pass of `x` per measured layer, plus two.
    """
    import torch

    from mpdeploy.sparsity.pruned import load_pruned

    art = load_pruned(pruned_dir, which="dense", verify=False)
    model = art.model
    params = dict(model.named_parameters())
    x = torch.as_tensor(x)

    def effect(z, z0) -> dict[str, float]:
        linf = (z - z0).abs().amax(dim=1)
        rel = (z - z0).norm(dim=1) / z0.norm(dim=1).clamp_min(1e-12)
        return {"logit_effect": float(linf.mean()), "relative_l2": float(rel.mean()),
                "flips": float((z.argmax(1) != z0.argmax(1)).float().mean())}

    pruned = [(i, layer) for i, layer in enumerate(layers)
              if layer.get("pattern") and layer.get("param") in art.masks and layer.get("param") in params]
    wanted = [pruned[i] for i in spread_order(len(pruned))][: max_layers if max_layers is not None else None]
    start, stopped = clock(), "all layers" if len(wanted) == len(pruned) else "max layers"
    measured = []
    if progress:
        progress("sensitivity", 0, len(wanted))
    with torch.no_grad():
        z0 = model(x).float()
        for done, (index, layer) in enumerate(wanted):
            if budget_s is not None and clock() - start >= budget_s:
                stopped = "time budget"
                break
            weight = params[layer["param"]]
            saved = weight.detach().clone()
            weight.mul_(art.masks[layer["param"]].to(weight.dtype))
            z = model(x).float()
            weight.copy_(saved)
            measured.append((index, {"layer": layer["name"], "param": layer["param"], "pattern": layer["pattern"],
                                     "signal": layer.get("signal"), "z": layer.get("z"), "macs": layer.get("macs"),
                                     **effect(z, z0)}))
            if progress:
                progress("sensitivity", done + 1, len(wanted))
        for param, mask in art.masks.items():
            if param in params:
                params[param].mul_(mask.to(params[param].dtype))
        joint = effect(model(x).float(), z0)
    records = [r for _, r in sorted(measured, key=lambda ir: ir[0])]  # back in network order
    signals = [(r["signal"], r["logit_effect"]) for r in records if r["signal"] is not None]
    rho = None
    if len(signals) >= 3 and np.ptp([s for s, _ in signals]) > 0 and np.ptp([e for _, e in signals]) > 0:
        from scipy.stats import spearmanr

        value = spearmanr([s for s, _ in signals], [e for _, e in signals]).statistic
        rho = None if value is None or not np.isfinite(value) else float(value)
    return {"images": int(x.shape[0]), "layers": records, "all_layers": joint,
            "sum_of_single_effects": float(sum(r["logit_effect"] for r in records)),
            "spearman_signal_vs_effect": rho, "layers_pruned": len(pruned), "layers_measured": len(records),
            "stopped": stopped, "seconds": round(clock() - start, 3)}


def torch_reference(pruned_dir: Path, x) -> dict[str, np.ndarray]:
    """Logits of the pruned artifact's sparse and dense PyTorch models (what the engines should compute)."""
    import torch

    from mpdeploy.sparsity.pruned import load_pruned

    out = {}
    with torch.no_grad():
        for which in ("sparse", "dense"):
            out[which] = load_pruned(pruned_dir, which=which, verify=False).model(torch.as_tensor(x)).float().numpy()
    return out
