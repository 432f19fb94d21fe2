"""Prune-restore: refit the kept weights of each masked layer inside its fixed mask.

For a layer with dense weights W (before masking) and inputs X [rows, K] (Linear: the input
features; Conv: im2col patches from F.unfold, columns in the weight's own flattened order
C_in*kh*kw), H = X^T X / rows and lambda = damp * mean(diag H). Two solvers:

- `obs` (default): the Optimal Brain Surgeon sweep of SparseGPT inside the fixed mask
  (mpdeploy.sparsity.obs): one Cholesky factor of (H + lambda I)^-1 per layer, column-by-column updates in
  blocks. O(K^3 + out K^2) per layer.
- `exact` (the reference): per output row with kept set K the ridge least squares
  w_K = (H_KK + lambda I)^-1 H_K,: w, batched Cholesky per row. O(out |K|^3) per layer.

Scheme: sequential, in one forward pass. A pre-hook on each masked layer refits it from the inputs it
receives, which come through every earlier layer already pruned and restored; the target is the dense
weights applied to those same inputs. Each layer is judged on held-out samples (relative output error
vs the dense weights on the same inputs) and rolled back to its pruned weights if the refit did not
lower that error. The mask never changes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mpdeploy.core.errors import MpdeployError
from mpdeploy.sparsity.obs import SINGLE_THREAD_WORK, obs_sweep, reduction_order, refine_masked_ridge, upper_inverse_factor
from mpdeploy.sparsity.stats import add_gram_, symmetrize_
from mpdeploy.sparsity.threads import single_thread

if TYPE_CHECKING:
    from mpdeploy.sparsity.stats import InputStats, MaskChoice

logger = logging.getLogger(__name__)

DEFAULT_DAMP = 1e-2
MAX_ROWS_PER_BATCH = 8192  # input rows (tokens / im2col positions) sampled per batch
CG_STEPS = 8  # conjugate-gradient steps after the OBS sweep (benchmarks/restore_timing.py measures the gap)
SOLVE_CHUNK_BYTES = 256 << 20  # working memory of one batched Cholesky chunk


# ----------------------------------------------------------------------------------------------
# inputs as rows matching the weight's flattened reduction order
# ----------------------------------------------------------------------------------------------


def conv_input_padding(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
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


def layer_rows(module: nn.Module, x: torch.Tensor, max_rows: int | None = None,
               gen: torch.Generator | None = None) -> torch.Tensor:
    """The layer's input as [rows, K] with columns in the order of weight.reshape(out, -1).

    With `max_rows`, a larger input gives only `max_rows` of its rows, drawn with
    torch.randperm(rows, generator=gen): the same rows as sampling the full matrix, without building it."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return rows[_sample(rows.shape[0], max_rows, gen, x.device)] if max_rows and rows.shape[0] > max_rows else rows
    if isinstance(module, nn.Conv2d):
        return _conv_rows(module, x, max_rows, gen)
    raise MpdeployError(f"restore supports nn.Linear and nn.Conv2d, not {type(module).__name__}")


def _sample(count: int, max_rows: int, gen: torch.Generator | None, device) -> torch.Tensor:
    return torch.randperm(count, generator=gen)[:max_rows].to(device)


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, max_rows: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """im2col rows [B*OH*OW, C_in*kh*kw] (C_in slowest, as F.unfold) from kh*kw strided views of the
    channels-last input: plain copies, several times faster than torch's im2col on CPU, and only the
    sampled positions are gathered when the map has more rows than `max_rows`."""
    x, padding = conv_input_padding(conv, x)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    b, c, h, w = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    pixels = x.permute(0, 2, 3, 1)  # [B, H, W, C], a view
    count = b * oh * ow
    if max_rows and count > max_rows:
        pos = _sample(count, max_rows, gen, x.device)
        bi, yi, xi = pos // (oh * ow), (pos % (oh * ow)) // ow * sh, pos % ow * sw
        taps = [pixels[bi, yi + i * dh, xi + j * dw] for i in range(kh) for j in range(kw)]  # each [n, C]
    else:
        taps = [pixels[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
                for i in range(kh) for j in range(kw)]  # each [B, OH, OW, C]
    return torch.stack(taps, dim=-1).reshape(-1, c * kh * kw)


def rows_match_output(module: nn.Module, x: torch.Tensor) -> bool:
    """Do the reconstructed rows reproduce the layer's real output? (guards the im2col layout).
    Checked on the first sample; `module.forward` runs no hooks."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return False
    x = x[:1]
    rows = layer_rows(module, x).double()
    output = module.forward(x).double()
    w = module.weight.detach().reshape(module.weight.shape[0], -1).to(rows.dtype)
    pred = rows[:64] @ w.T
    if isinstance(module, nn.Linear):
        real = output.reshape(-1, output.shape[-1])[:64]
    else:
        real = output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])[:64]
    if module.bias is not None:
        real = real - module.bias.detach().to(real.dtype)
    scale = float(real.abs().max()) + 1e-12
    return float((pred - real.to(pred.dtype)).abs().max()) <= 1e-3 * scale


# ----------------------------------------------------------------------------------------------
# the refit
# ----------------------------------------------------------------------------------------------


def refit_rows(dense: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, lam: float) -> torch.Tensor:
    """Mask-fixed ridge refit. dense, mask: [out, K]; h: [K, K] (X^T X / rows). Returns [out, K]
    weights (float64) that are zero outside the mask."""
    dense = dense.double()
    h = h.double()
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




def refit_obs(dense: torch.Tensor, mask: torch.Tensor, h: torch.Tensor, lam: float,
              shape: tuple[int, ...] | None = None, cg_steps: int = CG_STEPS) -> torch.Tensor:
    """Mask-fixed OBS refit (one Cholesky factor for the whole layer), then `cg_steps` conjugate-gradient
    steps toward the exact ridge solution. dense, mask: [out, K] in the weight's flattened order;
    h: [K, K]; `shape` (the weight's) only orders the sweep along the N:M groups for conv weights.
    Returns [out, K] float64, zero outside the mask."""
    order = reduction_order(shape) if shape is not None and len(shape) == 4 else torch.arange(h.shape[0])
    order = order.to(h.device)
    u = upper_inverse_factor(h[order.unsqueeze(1), order], lam)
    new, _ = obs_sweep(dense[:, order], u, keep=mask[:, order])
    out = torch.zeros_like(dense, dtype=torch.float32)
    out[:, order] = new
    return refine_masked_ridge(out, dense, mask, h, lam, cg_steps).double()


SOLVERS = {"obs": refit_obs, "exact": lambda dense, mask, h, lam, shape=None: refit_rows(dense, mask, h, lam)}


def relative_errors(weights: list[torch.Tensor], dense: torch.Tensor, h: torch.Tensor) -> list[float]:
    """||X (W - W_dense)^T||^2 / ||X W_dense^T||^2 from the Gram matrix H = X^T X, for each W.
    Computed in the widest dtype of the inputs (float64 inputs: float64; float32 ones: float32, several
    times faster on CPU, sums in float64); the denominator and every W in one product with H."""
    dtype = dense.dtype if dense.dtype == torch.float64 else torch.float32
    h = h.to(dtype)
    dense = dense.to(dtype)
    stacked = torch.cat([dense, *(weight.to(dtype) - dense for weight in weights)])
    quad = ((stacked @ h) * stacked).sum(1, dtype=torch.float64).reshape(1 + len(weights), -1).sum(1)
    den = float(quad[0])
    return [float(num) / den if den > 0 else 0.0 for num in quad[1:]]


JUDGE_CHUNKS = 8  # output-row chunks of `least_relative_error`'s bounded sums


def least_relative_error(weights: list[torch.Tensor], dense: torch.Tensor, h: torch.Tensor,
                         first: int = 0) -> tuple[int, float]:
    """(index, relative error) of the W in `weights` with the least `relative_errors` value (the lowest
    index on a tie): the minimum of `relative_errors`, with less work. Each numerator is a sum over
    output rows of terms >= 0 (H is positive semi-definite), so once the rows summed so far exceed the
    best numerator the W cannot win, and its other rows are skipped. weights[first] (put the likely
    winner there) is summed whole, with the denominator, in one product."""
    dtype = dense.dtype if dense.dtype == torch.float64 else torch.float32
    h = h.to(dtype)
    dense = dense.to(dtype)
    stacked = torch.cat([dense, weights[first].to(dtype) - dense])
    den, best_num = ((stacked @ h) * stacked).sum(1, dtype=torch.float64).reshape(2, -1).sum(1).tolist()
    if den <= 0:
        return 0, 0.0
    best = first
    step = -(-dense.shape[0] // JUDGE_CHUNKS)
    for i, weight in enumerate(weights):
        if i == first:
            continue
        num = 0.0
        for a in range(0, dense.shape[0], step):
            diff = weight[a : a + step].to(dtype) - dense[a : a + step]
            num += float(((diff @ h) * diff).sum(dtype=torch.float64))
            if num > best_num:
                break
        else:
            if num < best_num or (num == best_num and i < best):
                best, best_num = i, num
    return best, best_num / den


def relative_error(weight: torch.Tensor, dense: torch.Tensor, h: torch.Tensor) -> float:
    """||X (W - W_dense)^T||^2 / ||X W_dense^T||^2 from the Gram matrix H = X^T X."""
    return relative_errors([weight], dense, h)[0]


def add_layer_gram_(acc: torch.Tensor | None, module: nn.Module, x: torch.Tensor, chunk: int, gen: torch.Generator,
                    max_rows: int | None = MAX_ROWS_PER_BATCH) -> tuple[torch.Tensor | None, int]:
    """(acc + X^T X of the layer input `x`, rows added): float32, in place on the block upper triangle
    (`stats.add_gram_`; `stats.symmetrize_` completes it), in chunks of `chunk` samples with at most
    `max_rows` rows sampled per chunk (bounds memory and work on large feature maps)."""
    count = 0
    for part in x.split(max(1, chunk)):
        rows = layer_rows(module, part, max_rows, gen)
        acc = add_gram_(acc, rows)
        count += rows.shape[0]
    return acc, count


def gram_of(module: nn.Module, x: torch.Tensor, chunk: int, gen: torch.Generator) -> tuple[torch.Tensor | None, int]:
    """(sum of X^T X in float32, rows) of the layer input `x`, in chunks of `chunk` samples with at
    most MAX_ROWS_PER_BATCH rows sampled per chunk (bounds memory on large feature maps)."""
    total, count = add_layer_gram_(None, module, x, chunk, gen)
    return symmetrize_(total), count


def _refit_layer(module, x, n_calib, chunk, dense, mask, entry, *, damp, solver, gen) -> None:
    """Refit one layer from its input batch x (calibration samples first, then held-out ones)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        entry["reason"] = "grouped conv: not refit"
        return
    if not rows_match_output(module, x):
        entry["reason"] = "could not reproduce this layer's inputs as im2col rows: not refit"
        return
    h_sum, n_rows = gram_of(module, x[:n_calib], chunk, gen)
    held = x[n_calib:] if x.shape[0] > n_calib else x[:n_calib]
    h_judge, judge_rows = gram_of(module, held, chunk, gen)
    h, h_judge = h_sum / n_rows, h_judge / max(1, judge_rows)
    weight = module.weight
    shape = tuple(weight.shape)
    # float32 unless the model is float64: the judge's products are the largest after the refit's.
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dense = dense.to(weight.device).reshape(shape[0], -1).to(work_dtype)
    mask2d = mask.to(weight.device).reshape(shape[0], -1).bool()
    pruned = weight.detach().reshape(shape[0], -1).to(work_dtype)
    lam = damp * float(torch.diagonal(h).mean())
    if lam <= 0:
        lam = 1e-8
    refit = SOLVERS[solver](dense, mask2d, h, lam, shape=shape)
    before, after = relative_errors([pruned, refit], dense, h_judge)
    entry.update(error_before=before, error_after=after, **{"lambda": lam}, calib_rows=n_rows,
                 judge_rows=judge_rows, solver=solver)
    if after < before and bool(torch.isfinite(refit).all()):
        with torch.no_grad():
            weight.copy_((refit * mask2d).to(weight.dtype).reshape(shape))
        entry["improved"] = True
    else:
        entry["reason"] = "held-out error did not drop: kept the pruned weights"


def restore_from_stats(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    choices: dict[str, MaskChoice],
    stats: dict[str, InputStats],
    *,
    dense_state: dict[str, torch.Tensor],
    damp: float = DEFAULT_DAMP,
) -> dict[str, dict]:
    """Mask-fixed refit of the kept weights, in place, from the covariances the mask selection already
    accumulated (one Hessian per layer shared by selection and restore: no forward pass of its own).

    The covariances are of the dense model's inputs (calibration for the fit, held-out for the judge),
    so each layer is refit independently rather than sequentially. A layer whose selection already
    refit it on the same covariance (`MaskChoice.refit`: SparseGPT's OBS sweep + CG, the same solver
    and damping) is left as it is: restore would compute the same weights bit for bit. Other layers get
    the `obs` refit and are rolled back if the held-out error did not drop. `choices` and `stats` are
    keyed by module name, `masks` and `dense_state` by parameter name; returns restore_layers' report.
    """
    modules = {f"{name}.weight": name for name, _ in model.named_modules()}
    report: dict[str, dict] = {}
    for param, mask in masks.items():
        if param not in modules or param not in dense_state:
            raise MpdeployError(f"no module or dense weights for {param!r}; re-run `mpdeploy prune`")
        name = modules[param]
        start = time.perf_counter()
        entry = {"error_before": None, "error_after": None, "improved": False, "lambda": None,
                 "judged_on": "held_out", "scheme": "shared-hessian"}
        report[name] = entry
        module = model.get_submodule(name)
        work = module.weight.shape[0] * (module.weight.numel() // module.weight.shape[0]) ** 2
        with single_thread(work < SINGLE_THREAD_WORK):
            _refit_from_stats(module, dense_state[param], mask, choices.get(name), stats.get(name), entry, damp=damp)
        entry["seconds"] = time.perf_counter() - start
        logger.info("restore %s: held-out error %s -> %s (%s)", name, entry["error_before"], entry["error_after"],
                    "kept" if entry["improved"] else entry.get("reason"))
    return report


def _refit_from_stats(module, dense, mask, choice, stats, entry, *, damp) -> None:
    """Refit one layer from its accumulated covariances (in place on the module and `entry`)."""
    h = None if stats is None else stats.hessian()
    if h is None:
        entry["reason"] = "no calibration inputs reached this layer"
        return
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        entry["reason"] = "grouped conv: not refit"
        return
    if stats.rows_match is False:
        entry["reason"] = "could not reproduce this layer's inputs as im2col rows: not refit"
        return
    if stats.held_gram is None or not stats.held_rows:
        entry["judged_on"] = "calib (no held-out batches)"
    lam = damp * float(torch.diagonal(h).mean())
    if lam <= 0:
        lam = 1e-8
    entry.update(**{"lambda": lam}, calib_rows=stats.gram_rows, judge_rows=stats.held_rows or stats.gram_rows,
                 solver="obs")
    if choice is not None and choice.refit and damp == DEFAULT_DAMP:
        entry.update(error_before=choice.error, error_after=choice.error,
                     reason="the mask selection already refit these weights on this covariance (OBS + CG at "
                            "this damping): restore would compute the same weights")
        return
    weight = module.weight
    shape = tuple(weight.shape)
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dense = dense.to(weight.device).reshape(shape[0], -1).to(work_dtype)
    mask2d = mask.to(weight.device).reshape(shape[0], -1).bool()
    pruned = weight.detach().reshape(shape[0], -1).to(work_dtype)
    refit = refit_obs(dense, mask2d, h, lam, shape=shape)
    before, after = relative_errors([pruned, refit], dense, stats.hessian(held=True))
    entry.update(error_before=before, error_after=after)
    if after < before and bool(torch.isfinite(refit).all()):
        with torch.no_grad():
            weight.copy_((refit * mask2d).to(weight.dtype).reshape(shape))
        entry["improved"] = True
    else:
        entry["reason"] = "held-out error did not drop: kept the pruned weights"


def restore_layers(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    calib: list[torch.Tensor],
    held_out: list[torch.Tensor],
    *,
    dense_state: dict[str, torch.Tensor] | None = None,
    damp: float = DEFAULT_DAMP,
    seed: int = 0,
    solver: str = "obs",
) -> dict[str, dict]:
    """Mask-fixed refit of the kept weights, in place, layer by layer in forward order.

    One forward pass over the calibration and held-out samples together: a pre-hook refits each masked
    layer from the inputs it receives, which already come through every earlier refit layer (the
    sequential scheme), before the layer runs. `solver`: "obs" (one Cholesky factor per layer, the
    default) or "exact" (a ridge solve per output row; the reference, rows x |K|^3).

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
    if solver not in SOLVERS:
        raise MpdeployError(f"unknown restore solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    modules = {f"{name}.weight": name for name, _ in model.named_modules()}
    for param in masks:
        if param not in modules:
            raise MpdeployError(f"mask for {param!r} does not match a module weight of this model")
        if param not in dense_state:
            raise MpdeployError(f"no dense weights for {param!r}; re-run `mpdeploy prune`")
    was_training = model.training
    model.eval()
    judged_on = "held_out" if held_out else "calib (no held-out batches)"
    gen = torch.Generator().manual_seed(seed)
    n_calib, chunk = sum(len(b) for b in calib), len(calib[0])
    report: dict[str, dict] = {}

    def pre_hook(name: str, param: str):
        def fn(module, inputs):
            if name in report:  # a module called twice per forward is refit on its first call only
                return
            start = time.perf_counter()
            entry = {"error_before": None, "error_after": None, "improved": False, "lambda": None,
                     "judged_on": judged_on}
            report[name] = entry
            weight = module.weight
            work = weight.shape[0] * (weight.numel() // weight.shape[0]) ** 2
            with single_thread(work < SINGLE_THREAD_WORK):
                _refit_layer(module, inputs[0].detach(), n_calib, chunk, dense_state[param], masks[param], entry,
                             damp=damp, solver=solver, gen=gen)
            entry["seconds"] = time.perf_counter() - start
            logger.info("restore %s: held-out error %s -> %s (%s)", name, entry["error_before"],
                        entry["error_after"], "kept" if entry["improved"] else "rolled back")
        return fn

    handles = [model.get_submodule(modules[p]).register_forward_pre_hook(pre_hook(modules[p], p)) for p in masks]
    try:
        with torch.no_grad():
            model(torch.cat([*calib, *held_out]))
    finally:
        for handle in handles:
            handle.remove()
    for param in masks:
        report.setdefault(modules[param], {"error_before": None, "error_after": None, "improved": False,
                                           "lambda": None, "judged_on": judged_on,
                                           "reason": "no calibration inputs reached this layer"})
    model.train(was_training)
    return report
