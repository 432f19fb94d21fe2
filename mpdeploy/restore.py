"""Prune-restore: refit the kept weights of each masked layer inside its fixed mask.

For a layer with dense weights W (before masking) and inputs X [rows, K] (Linear: the input
features; Conv: im2col patches from F.unfold, columns in the weight's own flattened order
C_in*kh*kw), each output row with kept set K solves

    w_K = (H_KK + lambda I)^-1 H_K,: w,    H = X^T X / rows,    lambda = damp * mean(diag H)

i.e. the kept weights that best reproduce the dense row's output on calibration inputs (ridge
least squares). Rows with the same number of kept weights (all rows, for N:M) are solved together
with a batched Cholesky, chunked to bound memory. The mask never changes.

Scheme: sequential. Layers are processed in forward order and each one sees the inputs produced by
the model as it stands, i.e. with every earlier layer already pruned and restored; the target is the
dense weights applied to those same inputs. Each layer is judged on held-out batches (relative output
error vs the dense weights on the same inputs) and rolled back to its pruned weights if the refit did
not lower that error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__name__)

DEFAULT_DAMP = 1e-2
MAX_ROWS_PER_BATCH = 8192  # input rows (tokens / im2col positions) sampled per batch
SOLVE_CHUNK_BYTES = 256 << 20  # working memory of one batched Cholesky chunk


class _Stop(Exception):
    """Raised by a capture hook once the layer's inputs are taken: the rest of the forward is waste."""


# ----------------------------------------------------------------------------------------------
# inputs as rows matching the weight's flattened reduction order
# ----------------------------------------------------------------------------------------------


def _conv_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the input the way the conv's forward does; returns (input, remaining zero padding)."""
    if type(conv).__name__ == "Conv2dSame":  # timm: dynamic TF-style "same" padding in forward
        from timm.layers.padding import pad_same

        return pad_same(x, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0, 0)
        # "same" (stride 1): total padding dilation*(k-1), the extra one on the right/bottom.
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0, 0)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    return x, tuple(conv.padding)


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as [rows, K] with columns in the order of weight.reshape(out, -1)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        x, padding = _conv_padding(module, x)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B*L, C_in*kh*kw], C_in slowest
    raise MpdeployError(f"restore supports nn.Linear and nn.Conv2d, not {type(module).__name__}")


def _check_rows(module: nn.Module, rows: torch.Tensor, output: torch.Tensor, idx: torch.Tensor) -> bool:
    """Do the reconstructed rows reproduce the layer's real output? (guards the im2col layout)."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1).to(rows.dtype)
    pred = rows[idx[:64]] @ w.T
    if isinstance(module, nn.Linear):
        real = output.reshape(-1, output.shape[-1])[idx[:64]]
    else:
        real = output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])[idx[:64]]
    if module.bias is not None:
        real = real - module.bias.detach().to(real.dtype)
    scale = float(real.abs().max()) + 1e-12
    return float((pred - real.to(pred.dtype)).abs().max()) <= 1e-3 * scale


def _gram(
    model: nn.Module, name: str, batches: Iterable[torch.Tensor], gen: torch.Generator, check: bool
) -> tuple[torch.Tensor | None, int, bool]:
    """Sum of X^T X (float64) over the batches for layer `name`, the number of rows, and whether
    the rows reproduced the layer's output (checked on the first batch when `check`)."""
    module = model.get_submodule(name)
    state = {"h": None, "rows": 0, "ok": True, "checked": not check}

    def hook(mod, inputs, output):
        x = layer_rows(mod, inputs[0].detach())
        idx = torch.arange(x.shape[0], device=x.device)
        if x.shape[0] > MAX_ROWS_PER_BATCH:
            idx = torch.randperm(x.shape[0], generator=gen)[:MAX_ROWS_PER_BATCH].to(x.device)
        if not state["checked"]:
            state["ok"] = _check_rows(mod, x.double(), output.detach().double(), idx)
            state["checked"] = True
        # float32 product for float32/16 models (several times faster than float64 on CPU),
        # float64 running sum.
        xs = x[idx].double() if x.dtype == torch.float64 else x[idx].float()
        h = (xs.T @ xs).double()
        state["h"] = h if state["h"] is None else state["h"] + h
        state["rows"] += xs.shape[0]
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return state["h"], state["rows"], state["ok"]


# ----------------------------------------------------------------------------------------------
# the refit
# ----------------------------------------------------------------------------------------------


def refit_rows(dense: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, lam: float) -> torch.Tensor:
    """Mask-fixed ridge refit. dense, mask: [out, K]; h: [K, K] (X^T X / rows). Returns [out, K]
    weights (float64) that are zero outside the mask."""
    dense = dense.double()
    mask = mask.bool()
    out = torch.zeros_like(dense)
    hw = dense @ h  # row r: (H w_r)^T, so H_K,: w_r = hw[r, K]
    counts = mask.sum(1)
    eye_cache: dict[int, torch.Tensor] = {}
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        rows = torch.nonzero(counts == count).squeeze(1)
        # Kept column indices per row, ascending (a stable sort puts the True entries first).
        kept = torch.sort((~mask[rows]).to(torch.uint8), dim=1, stable=True).indices[:, :count]
        eye = eye_cache.setdefault(count, torch.eye(count, dtype=torch.float64, device=h.device))
        chunk = max(1, SOLVE_CHUNK_BYTES // (8 * count * count))
        for start in range(0, rows.numel(), chunk):
            r, kidx = rows[start : start + chunk], kept[start : start + chunk]
            h_kk = h[kidx.unsqueeze(2), kidx.unsqueeze(1)] + lam * eye  # [chunk, count, count]
            rhs = torch.gather(hw[r], 1, kidx).unsqueeze(2)
            chol, info = torch.linalg.cholesky_ex(h_kk)
            if bool((info != 0).any()):  # not positive definite (degenerate inputs): least squares instead
                sol = torch.linalg.lstsq(h_kk, rhs).solution
            else:
                sol = torch.cholesky_solve(rhs, chol)
            out[r.unsqueeze(1), kidx] = sol.squeeze(2)
    return out


def relative_error(weight: torch.Tensor, dense: torch.Tensor, h: torch.Tensor) -> float:
    """||X (W - W_dense)^T||^2 / ||X W_dense^T||^2 from the Gram matrix H = X^T X."""
    diff = weight.double() - dense.double()
    num = float(((diff @ h) * diff).sum())
    den = float(((dense.double() @ h) * dense.double()).sum())
    return num / den if den > 0 else 0.0


def _forward_order(model: nn.Module, names: list[str], batch: torch.Tensor | None) -> list[str]:
    """Layer names in the order the forward pass first calls them (module order as a fallback)."""
    if batch is None:
        return names
    order: list[str] = []
    handles = []
    for name in names:
        def hook(mod, inputs, output, name=name):
            if name not in order:
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


def restore_layers(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    calib: list[torch.Tensor],
    held_out: list[torch.Tensor],
    *,
    dense_state: dict[str, torch.Tensor] | None = None,
    damp: float = DEFAULT_DAMP,
    seed: int = 0,
) -> dict[str, dict]:
    """Mask-fixed least-squares refit of the kept weights, in place, layer by layer in forward order.

    `masks` and `dense_state` are keyed by parameter name (f"{module}.weight"); `dense_state` holds the
    weights before masking (prune.py's `dense_state`). Returns per module name {"error_before",
    "error_after", "improved", "lambda", ...}, errors measured on `held_out` (on `calib` when there is
    no held-out batch; the report's "judged_on" says which). A layer whose held-out error did not drop
    is rolled back to its pruned weights. Masks never change.
    """
    if not calib:
        raise MpdeployError("--restore needs calibration data; pass --calib DIR|digits")
    if dense_state is None:
        raise MpdeployError(
            "restore needs the dense weights from before masking (restore_layers(..., dense_state=...)); "
            "internal error: the prune stage did not pass them"
        )
    was_training = model.training
    model.eval()
    modules = {f"{name}.weight": name for name, _ in model.named_modules()}
    names = []
    for param in masks:
        if param not in modules:
            raise MpdeployError(f"mask for {param!r} does not match a module weight of this model")
        if param not in dense_state:
            raise MpdeployError(f"no dense weights for {param!r}; re-run `mpdeploy prune`")
        names.append(modules[param])
    judge = held_out if held_out else calib
    judged_on = "held_out" if held_out else "calib (no held-out batches)"
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, dict] = {}
    for name in _forward_order(model, names, calib[0]):
        start = time.perf_counter()
        module = model.get_submodule(name)
        param = f"{name}.weight"
        weight = module.weight
        entry: dict = {"error_before": None, "error_after": None, "improved": False, "lambda": None,
                       "judged_on": judged_on}
        report[name] = entry
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            entry["reason"] = "grouped conv: not refit"
            continue
        h_sum, n_rows, ok = _gram(model, name, calib, gen, check=True)
        if h_sum is None or n_rows == 0:
            entry["reason"] = "no calibration inputs reached this layer"
            continue
        if not ok:
            entry["reason"] = "could not reproduce this layer's inputs as im2col rows: not refit"
            continue
        h_judge, judge_rows, _ = _gram(model, name, judge, gen, check=False)
        h = h_sum / n_rows
        h_judge = h_judge / max(1, judge_rows)
        shape = weight.shape
        dense = dense_state[param].to(weight.device).reshape(shape[0], -1).double()
        mask = masks[param].to(weight.device).reshape(shape[0], -1).bool()
        pruned = weight.detach().reshape(shape[0], -1).double()
        lam = damp * float(torch.diagonal(h).mean())
        if lam <= 0:
            lam = 1e-8
        refit = refit_rows(dense, mask, h, lam)
        before = relative_error(pruned, dense, h_judge)
        after = relative_error(refit, dense, h_judge)
        entry.update(error_before=before, error_after=after, **{"lambda": lam},
                     calib_rows=n_rows, judge_rows=judge_rows)
        if after < before and bool(torch.isfinite(refit).all()):
            with torch.no_grad():
                new = (refit * mask).to(weight.dtype).reshape(shape)
                weight.copy_(new * masks[param].to(weight.device, weight.dtype))
            entry["improved"] = True
        else:
            entry["reason"] = "held-out error did not drop: kept the pruned weights"
        entry["seconds"] = time.perf_counter() - start
        logger.info("restore %s: held-out error %.4g -> %.4g (%s)", name, before, after,
                    "kept" if entry["improved"] else "rolled back")
    model.train(was_training)
    return report
