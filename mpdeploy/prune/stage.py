"""The prune stage: model + calibration data -> `pruned/` artifact.

Artifact files: `model.safetensors` (pruned weights), `dense.safetensors` (the dense source in the same
channel order: the teacher and the dense twin), `masks.safetensors` (bool keep-masks by parameter
name), `manifest.json` (config, per-layer fit / signal / pattern / skip reason / MACs, totals).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core import artifacts, atomic
from mpdeploy.sparsity.budgets import Candidate, get_budget
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.kinds import PrunedFolder
from mpdeploy.prune.calibration import choose_forward_dtype, load_calibration
from mpdeploy.sparsity.calib_precision import CALIB_DTYPES
from mpdeploy.sparsity.layers import LayerInfo, count_macs, find_layers, skip_reason
from mpdeploy.models.spec import LoadedModel
from mpdeploy.sparsity.patterns import NM, is_nm_compliant, parse_pattern
from mpdeploy.sparsity.saliency import (HESSIAN_ROWS_PER_IMAGE, HESSIAN_WIDE_K, choose_mask, collect_stats,
                                        get_saliency, removed_energy_fraction)
from mpdeploy.sparsity.stats import InputStats

logger = logging.getLogger(__name__)

KIND = "pruned"
Progress = Callable[[str, int, int], None]
# Below this many rows/columns the MP fit still runs (and is reported) but gives no budget signal: the
# bulk edge of a 32x216 stem conv is not a reliable noise estimate, and on the digits CNN such layers
# looked most noise-like while being the most sensitive. They get the neutral weight instead.
MIN_SIGNAL_DIM = 64


@dataclass(frozen=True)
class PruneConfig:
    pattern: NM = NM(2, 4)
    extra_patterns: tuple[NM, ...] = ()  # further options for the mp budget (e.g. 8:16)
    budget: str = "mp"
    saliency: str = "magnitude"
    calib: str | None = None  # "digits" | "synthetic" | ImageFolder dir
    calib_batches: int = 8
    calib_batch_size: int = 16
    calib_dtype: str = "auto"  # the calibration forward passes' dtype (sparsity.calib_precision)
    target_mac_reduction: float | None = None
    include_head: bool = False
    permute: bool = False
    permute_seconds: float | None = None  # time budget per layer for the permutation search
    restore: bool = False
    tome: tuple[int, ...] | int = 0
    seed: int = 0
    # Prune only what this backend runs sparse (trt | torch | ort); None: every layer the pattern fits.
    backend: str | None = None
    backend_precision: str | None = None  # the engine precision the backend's plan is for (torch)
    backend_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("conv1x1", "large"), ("kernel", "cusparselt"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "extra_patterns", tuple(parse_pattern(p) for p in self.extra_patterns))
        measured = get_budget(self.budget).damage == "logits"
        if (get_saliency(self.saliency).needs_calib or self.restore or measured) and not self.calib:
            need = ("--restore" if self.restore else f"budget {self.budget!r}" if measured
                    else f"saliency {self.saliency!r}")
            raise MpdeployError(f"{need} needs calibration data; pass --calib DIR|digits|synthetic")
        if self.calib_batches < 1 or self.calib_batch_size < 1:
            raise MpdeployError("--calib-batches and --calib-batch-size must be at least 1")
        if self.calib_dtype not in CALIB_DTYPES:
            raise MpdeployError(f"--calib-dtype {self.calib_dtype!r} is not one of {', '.join(CALIB_DTYPES)}")
        if self.backend is not None:
            from mpdeploy.backends.sparse_plan import check_target

            check_target(self.backend)
            if not self.pattern.runs_sparse:
                raise MpdeployError(f"--backend {self.backend} prunes for sparse kernels, which run 2:4-compatible "
                                    f"patterns only, not {self.pattern}; drop --backend or use --pattern 2:4")
        options = dict(self.backend_options)
        object.__setattr__(self, "backend_options", tuple(sorted((str(k), v) for k, v in options.items() if v is not None)))

    @property
    def patterns(self) -> tuple[NM, ...]:
        # Densest first: the budget walks options from least to most aggressive.
        return tuple(sorted({self.pattern, *self.extra_patterns}, key=lambda p: (-p.density, p.m)))


@dataclass
class PruneResult:
    model: nn.Module
    masks: dict[str, torch.Tensor]
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def _tome_schedule(tome) -> tuple[int, ...] | int:
    return tuple(tome) if isinstance(tome, (list, tuple)) else int(tome)


def _has_tome(tome) -> bool:
    return any(tome) if isinstance(tome, tuple) else tome > 0


def _fit_signal(weight: torch.Tensor, layer: LayerInfo) -> tuple[dict[str, Any] | None, float | None]:
    from mpdeploy.sparsity.spectral import fit_marchenko_pastur, spectral_matrices

    try:
        mats = spectral_matrices(weight.detach(), layer.groups)
        fits = [fit_marchenko_pastur(m) for m in mats if min(m.shape) >= 8]
    except Exception as exc:  # a degenerate matrix (all zeros, tiny) must not stop pruning
        logger.warning("MP fit failed for %s: %s", layer.name, exc)
        return None, None
    if not fits:
        return None, None
    fit = fits[0].to_dict() if len(fits) == 1 else {"groups": [f.to_dict() for f in fits]}
    if min(mats[0].shape) < MIN_SIGNAL_DIM:
        return fit, None
    signal = float(sum(f.bulk_fraction for f in fits) / len(fits))
    return fit, signal


def _collect_stats(model, names, calib, held, config: PruneConfig, forward_dtype: str) -> dict[str, InputStats]:
    needs = get_saliency(config.saliency).stats
    group_sizes = tuple(sorted({p.m for p in config.patterns})) if "group_cov" in needs else ()
    return collect_stats(model, names, calib, held, config.saliency, group_sizes, forward_dtype=forward_dtype)


def prune_model(loaded: LoadedModel, config: PruneConfig, progress: Progress | None = None) -> PruneResult:
    """Prune `loaded.module` in place and return masks and the per-layer record."""
    model = loaded.module.eval()
    step = progress or (lambda stage, done, total: None)
    dense_macs = count_macs(model, loaded.input_shape)
    extra = _merge_tokens(model, config)
    macs = count_macs(model, loaded.input_shape)
    layers, eligible, reasons = _prunable_layers(model, loaded.name, config)
    eligible, pruned_for = _prune_for_backend(model, loaded, config, eligible, reasons)
    if pruned_for:
        extra["pruned_for"] = pruned_for
    fits = _fit_signals(model, layers, step)
    calib, held, calib_info, stats, permutation_report = _calibrate_and_permute(
        model, loaded, config, eligible, step, sum(dense_macs.values()))
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    candidates, layer_masks = _candidates(model, eligible, config, stats, macs, fits, step)
    budget = get_budget(config.budget)
    if budget.damage == "logits":  # each option's damage measured on the outputs instead of in weight space
        from mpdeploy.sparsity.damage import logit_damage

        candidates = logit_damage(model, candidates, layer_masks, calib, step)
    total = sum(macs.values())
    assignment, target = budget.fn(candidates, total, config.target_mac_reduction, config.pattern)
    masks, chosen_by = _apply_assignment(model, eligible, assignment, layer_masks, reasons)

    restore_report: dict[str, Any] = {}
    if config.restore:
        restore_report = _restore(model, masks, calib, held, dense_state, stats,
                                  {name: layer_masks[(name, a.pattern)] for name, a in assignment.items() if a.pattern})
        step("restore", 1, 1)
    stats.clear()
    _check_patterns(model, eligible, masks, assignment)

    records = [
        _layer_record(layer, assignment.get(layer.name), fits[layer.name], macs.get(layer.name, 0), reasons[layer.name],
                      _options(candidates, layer.name), chosen_by.get(layer.name),
                      permutation_report.get(layer.name), restore_report.get(layer.name))
        for layer in layers
    ]
    totals = _totals(records, macs, dense_macs, target)
    extra.update({"calibration": calib_info, "budget_target": target})
    return PruneResult(model, masks, records, totals, {**extra, "dense_state": dense_state})


def _restore(model: nn.Module, masks: dict[str, torch.Tensor], calib, held, dense_state, stats: dict[str, InputStats],
             choices: dict[str, Any]) -> dict[str, Any]:
    """Refit the kept weights: from the covariances the mask selection accumulated when it has them (one
    Hessian per layer shared by both, no second pass), else the sequential pass of `restore_layers`."""
    from mpdeploy.sparsity.restore import restore_from_stats, restore_layers

    if any(s.gram is not None for s in stats.values()):
        return restore_from_stats(model, masks, choices, stats, dense_state=dense_state)
    stats.clear()  # full covariances can be large: free them before the restore pass
    return restore_layers(model, masks, calib, held, dense_state=dense_state)


def _merge_tokens(model: nn.Module, config: PruneConfig) -> dict[str, Any]:
    """Apply the ToMe schedule, if any; returns the manifest's `tome` entry ({} without merging)."""
    tome = _tome_schedule(config.tome)
    extra: dict[str, Any] = {}
    if _has_tome(tome):
        from mpdeploy.sparsity.tome import apply_tome

        apply_tome(model, tome)
        extra["tome"] = {"r": list(getattr(model, "_tome_r", [])) or tome}
    return extra


def _prunable_layers(model: nn.Module, model_name: str,
                     config: PruneConfig) -> tuple[list[LayerInfo], list[LayerInfo], dict[str, str | None]]:
    """(all layers, those that can take the pattern, {name: why skipped or None}); refuses a model with none."""
    layers = find_layers(model)
    if not layers:
        raise MpdeployError(
            f"{model_name} has no nn.Linear / nn.Conv2d layers to prune (in TorchScript / .pt2 programs, only "
            "aten.linear / aten.conv2d on a weight are); pass a timm name or a state_dict with --arch"
        )
    reasons = {layer.name: skip_reason(layer, config.pattern, config.include_head) for layer in layers}
    eligible = [layer for layer in layers if reasons[layer.name] is None]
    if not eligible:
        raise MpdeployError(f"no layer of {model_name} can take pattern {config.pattern}; see `mpdeploy analyze`")
    return layers, eligible, reasons


def _prune_for_backend(model: nn.Module, loaded: LoadedModel, config: PruneConfig, eligible: list[LayerInfo],
                       reasons: dict[str, str | None]) -> tuple[list[LayerInfo], dict[str, Any] | None]:
    """Keep dense the eligible layers `config.backend` would run dense anyway (their reason in `reasons`).

    Returns (the layers left to prune, the manifest's `pruned_for` record); unchanged without a backend."""
    if config.backend is None:
        return eligible, None
    from mpdeploy.backends.sparse_plan import sparse_plan

    plan = sparse_plan(model, loaded.input_shape, [layer.name for layer in eligible], config.backend,
                       config.backend_precision, dict(config.backend_options))
    for name, why in plan.runs_dense.items():
        reasons[name] = why
    kept = [layer for layer in eligible if layer.name not in plan.runs_dense]
    if not kept:
        example = next(iter(plan.runs_dense.values()), "")
        raise MpdeployError(f"backend {config.backend} runs none of {loaded.name}'s layers sparse (e.g. {example}); "
                            "nothing is worth pruning for it: build the dense engine, or prune for another backend")
    logger.info("pruning for %s: %d of %d eligible layers run sparse there", config.backend, len(kept), len(eligible))
    return kept, plan.record()


def _fit_signals(model: nn.Module, layers: list[LayerInfo],
                 step: Progress) -> dict[str, tuple[dict | None, float | None]]:
    """{layer: (MP fit record, budget signal)} for every layer, eligible or not (all are reported).
    The layers side by side, one BLAS thread each: numpy's Gram products and eigvalsh run outside the
    GIL, and on ViT-B/16 two BLAS threads per fit took twice the CPU seconds of one, and more wall time."""
    from threadpoolctl import threadpool_limits

    from mpdeploy.sparsity.threads import map_by_item

    with threadpool_limits(limits=1, user_api="blas"):
        results = map_by_item(lambda layer: _fit_signal(model.get_submodule(layer.name).weight, layer), layers,
                              cost=lambda layer: model.get_submodule(layer.name).weight.numel(),
                              done=lambda finished, total: step("fit", finished, total))
    return {layer.name: fit for layer, fit in zip(layers, results)}


def _calibrate_and_permute(model: nn.Module, loaded: LoadedModel, config: PruneConfig, eligible: list[LayerInfo],
                           step: Progress, macs_per_image: int):
    """(calibration batches, held-out batches, calibration record, input stats, permutation report).

    With --permute the channels are permuted in place, and the stats re-collected on the permuted model."""
    calib, held, calib_info = load_calibration(config.calib, config.calib_batches, config.calib_batch_size,
                                               config.seed, loaded)
    names = [layer.name for layer in eligible]
    forward_dtype = choose_forward_dtype(config.calib_dtype, macs_per_image, calib_info) if calib else "float32"
    stats = _collect_stats(model, names, calib, held, config, forward_dtype) if calib else {}
    if calib and "gram" in get_saliency(config.saliency).stats:
        # the OBS covariances sample at most this many rows per image at K >= HESSIAN_WIDE_K (more below)
        calib_info.update(hessian_rows_per_image=HESSIAN_ROWS_PER_IMAGE, hessian_wide_k=HESSIAN_WIDE_K)
    step("calibrate", 1, 1)

    permutation_report: dict[str, Any] = {}
    if config.permute:
        from mpdeploy.sparsity.permute.fold import permute_model

        permutation_report = permute_model(
            model, eligible, pattern=config.pattern, saliency=config.saliency, stats=stats,
            seconds_per_layer=config.permute_seconds,
        )
        if calib:  # the permuted layers see permuted inputs: refresh their statistics
            stats = _collect_stats(model, names, calib, held, config, forward_dtype)
        step("permute", 1, 1)
    return calib, held, calib_info, stats, permutation_report


def _candidates(model: nn.Module, eligible: list[LayerInfo], config: PruneConfig, stats: dict[str, InputStats],
                macs: dict[str, int], fits: dict[str, tuple[dict | None, float | None]], step: Progress):
    """(budget candidates, {(layer, pattern): mask choice}): every pattern a layer can take, with its damage.

    Layers are independent here: they run side by side, one torch thread each (`map_by_item`)."""
    from mpdeploy.sparsity.threads import map_by_item

    def options_of(layer: LayerInfo) -> list[tuple[NM, Any, float]]:
        weight, own = model.get_submodule(layer.name).weight, stats.get(layer.name)
        options = []
        for pattern in (p for p in config.patterns if layer.reduction % p.m == 0):
            choice = choose_mask(weight, pattern, config.saliency, own)
            options.append((pattern, choice, removed_energy_fraction(weight, choice.mask, config.saliency, own)))
        return options

    def cost(layer: LayerInfo) -> float:  # the OBS products and factor: out * K^2 + K^3
        return (layer.weight_shape[0] + math.prod(layer.weight_shape[1:])) * math.prod(layer.weight_shape[1:]) ** 2

    per_layer = map_by_item(options_of, eligible, cost=cost, done=lambda n, total: step("mask", n, total))
    candidates, layer_masks = [], {}
    for layer, options in zip(eligible, per_layer, strict=True):
        for pattern, choice, _ in options:
            layer_masks[(layer.name, pattern)] = choice
        _, signal = fits[layer.name]
        candidates.append(Candidate(layer.name, macs.get(layer.name, 0), signal,
                                    tuple((pattern, damage) for pattern, _, damage in options),
                                    is_mlp=".mlp." in f".{layer.name}."))
    return candidates, layer_masks


def _apply_assignment(model: nn.Module, eligible: list[LayerInfo], assignment, layer_masks,
                      reasons: dict[str, str | None]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Mask each layer with the pattern the budget gave it: ({param: keep-mask}, {layer: saliency chosen}).

    Layers the budget kept dense get their skip reason in `reasons`."""
    masks: dict[str, torch.Tensor] = {}
    chosen_by: dict[str, str] = {}
    with torch.no_grad():
        for layer in eligible:
            chosen = assignment[layer.name].pattern
            if chosen is None:
                reasons[layer.name] = "kept dense by the budget (high damage for the MACs it saves)"
                continue
            choice = layer_masks[(layer.name, chosen)]
            mask = choice.mask
            weight = model.get_submodule(layer.name).weight
            if choice.weight is not None:  # OBS criteria update the kept weights with the mask choice
                weight.copy_(choice.weight.to(weight.dtype))
            weight.mul_(mask.to(weight.dtype))
            masks[layer.param_name] = mask.bool()
            if choice.chosen:
                chosen_by[layer.name] = choice.chosen
    return masks, chosen_by


def _check_patterns(model: nn.Module, eligible: list[LayerInfo], masks: dict[str, torch.Tensor], assignment) -> None:
    """Every masked layer is still exactly its pattern, zeros where the mask says (restore must keep them)."""
    for layer in eligible:
        if layer.param_name in masks:
            pattern = assignment[layer.name].pattern
            weight = model.get_submodule(layer.name).weight
            if not is_nm_compliant(weight, pattern) or bool((weight.detach()[~masks[layer.param_name]] != 0).any()):
                raise RuntimeError(f"internal error: {layer.name} is not {pattern} after pruning")


def _layer_record(layer: LayerInfo, assigned, fit_signal, macs: int, reason: str | None, options,
                  saliency_chosen: str | None, permutation: Any, restore: Any) -> dict[str, Any]:
    """One layer's entry in the manifest's `layers` (`assigned`: its budget assignment, None if not eligible)."""
    pattern = assigned.pattern if assigned else None
    fit, signal = fit_signal
    return {
        "name": layer.name,
        "param": layer.param_name,
        "kind": layer.kind,
        "weight_shape": list(layer.weight_shape),
        "groups": layer.groups,
        "pattern": str(pattern) if pattern else None,
        "runs_sparse": bool(pattern and pattern.runs_sparse),
        "skipped": None if pattern else reason,
        "macs": macs,
        "macs_kept": int(macs * (pattern.density if pattern else 1.0)),
        "macs_executed": int(macs * (pattern.execution_density if pattern else 1.0)),
        "signal": signal,
        "z": assigned.z if assigned else None,
        "budget_weight": assigned.weight if assigned else None,
        "damage": next((d for p, d in options if p == pattern), None),
        "saliency_chosen": saliency_chosen,
        "fit": fit,
        "permutation": permutation,
        "restore": restore,
    }


def _options(candidates: list[Candidate], name: str):
    for c in candidates:
        if c.name == name:
            return c.options
    return ()


def _totals(records, macs, dense_macs, target) -> dict[str, Any]:
    """MAC accounting. Reductions are relative to the dense model without token merging."""
    base = sum(dense_macs.values())
    attention = sum(v for k, v in macs.items() if k.startswith("attention:"))
    kept = sum(r["macs_kept"] for r in records) + attention
    executed = sum(r["macs_executed"] for r in records) + attention
    return {
        "dense_macs": base,
        "macs_after_tome": sum(macs.values()),
        "layer_macs": sum(r["macs"] for r in records),
        "attention_macs": attention,
        "macs_kept": kept,
        "macs_executed": executed,
        "mac_reduction": 1 - kept / base if base else 0.0,
        "sparse_execution_mac_reduction": 1 - executed / base if base else 0.0,
        "pruned_layers": sum(1 for r in records if r["pattern"]),
        "sparse_layers": sum(1 for r in records if r["runs_sparse"]),
        "skipped_layers": sum(1 for r in records if not r["pattern"]),
        "budget_target_mac_reduction": target,
    }


def _state_for_save(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights): store contiguous copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def prune(loaded: LoadedModel, config: PruneConfig, out_dir: Path, progress: Progress | None = None,
          source_hash: str | None = None) -> Path:
    """Run the prune stage and write the `pruned/` artifact atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    atomic.check_target(out_dir)  # a bad --out fails before the work, not after it
    artifacts.check_replaceable(out_dir, KIND)
    result = prune_model(loaded, config, progress)
    dense_state = result.extra.pop("dense_state")
    with artifacts.atomic_dir(out_dir, kind=KIND) as tmp:
        save_file(_state_for_save(result.model.state_dict()), str(tmp / PrunedFolder.WEIGHTS["sparse"]))
        save_file(_state_for_save(dense_state), str(tmp / PrunedFolder.WEIGHTS["dense"]))
        save_file({k: v.to(torch.uint8).contiguous() for k, v in result.masks.items()}, str(tmp / PrunedFolder.MASKS))
        artifacts.write_manifest(
            tmp, KIND, config,
            inputs={"model": source_hash or artifacts.sha256_json(loaded.source)},
            extra={
                "model": {"name": loaded.name, "source": loaded.source, "input_shape": list(loaded.input_shape),
                          "num_classes": loaded.num_classes, "data_config": loaded.data_config},
                "layers": result.layers,
                "totals": result.totals,
                **result.extra,
            },
        )
    logger.info("pruned %d layers of %s -> %s", result.totals["pruned_layers"], loaded.name, out_dir)
    return out_dir
