"""Giving layers their dense weights back: state dicts, masks and the manifest's layer records (pure)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from mpdeploy.core.errors import MpdeployError


def layer_params(name: str, state: Mapping[str, torch.Tensor]) -> list[str]:
    """The parameters of layer `name` (its weight, and its bias when it has one)."""
    return [p for p in (f"{name}.weight", f"{name}.bias") if p in state]


def densify_state(sparse: Mapping[str, torch.Tensor], dense: Mapping[str, torch.Tensor],
                  masks: Mapping[str, torch.Tensor], layers: list[str]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, masks) with `layers` holding exactly the dense source's tensors and no mask; every
    other tensor and mask is the sparse artifact's, untouched."""
    state = dict(sparse)
    kept_masks = dict(masks)
    for name in layers:
        params = layer_params(name, sparse)
        if f"{name}.weight" not in params:
            raise MpdeployError(f"layer {name} has no weight in the pruned artifact; re-create it")
        for param in params:
            if param not in dense or dense[param].shape != sparse[param].shape:
                raise MpdeployError(f"the dense source has no {param} of shape {tuple(sparse[param].shape)}; "
                                    "re-run `mpdeploy prune`")
            state[param] = dense[param].clone()
        kept_masks.pop(f"{name}.weight", None)
    return state, kept_masks


def densify_records(records: list[dict[str, Any]], totals: Mapping[str, Any],
                    returned: Mapping[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The manifest's `layers` and `totals` after the `returned` layers ({name: why}) went back to dense."""
    out = copy.deepcopy(records)
    new = dict(totals)
    by_name = {r["name"]: r for r in out}
    missing = [name for name in returned if name not in by_name or not by_name[name].get("pattern")]
    if missing:
        raise MpdeployError(f"{', '.join(missing[:3])}: not a pruned layer of this artifact; nothing to give back")
    for name, why in returned.items():
        r = by_name[name]
        new["macs_kept"] = new.get("macs_kept", 0) + r["macs"] - r["macs_kept"]
        new["macs_executed"] = new.get("macs_executed", 0) + r["macs"] - r["macs_executed"]
        new["pruned_layers"] = new.get("pruned_layers", 0) - 1
        new["sparse_layers"] = new.get("sparse_layers", 0) - int(bool(r.get("runs_sparse")))
        new["skipped_layers"] = new.get("skipped_layers", 0) + 1
        r.update(densified={"was": r["pattern"], "why": why}, pattern=None, runs_sparse=False,
                 skipped=f"densified: {why}", macs_kept=r["macs"], macs_executed=r["macs"], damage=None)
    base = new.get("dense_macs") or 0
    if base:
        new["mac_reduction"] = 1 - new["macs_kept"] / base
        new["sparse_execution_mac_reduction"] = 1 - new["macs_executed"] / base
    return out, new
