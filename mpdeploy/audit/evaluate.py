"""Running both engines over the evaluation data; per-layer sensitivity in PyTorch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


from mpdeploy.audit.common import Progress
from mpdeploy.audit.metrics import dense_margins, topk_correct

logger = logging.getLogger(__name__)

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

    from mpdeploy.weights import load_pruned

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

    from mpdeploy.weights import load_pruned

    out = {}
    with torch.no_grad():
        for which in ("sparse", "dense"):
            out[which] = load_pruned(pruned_dir, which=which, verify=False).model(torch.as_tensor(x)).float().numpy()
    return out
