"""Prune for the backend, and give back what runs dense (issue 27): top-1 and sparse-execution MAC cut, on CPU.

Part 1, per model: prune every layer TensorRT's rules allow (`--backend trt`) vs only what the torch
backend converts (`--backend torch`, its fp16 cuSPARSELt plan, 1x1 convs >= 256 channels), both with the
uniform budget (every allowed layer 2:4, magnitude), and the TensorRT-pruned model densified by torch's
plan. For each: the sparse-execution MAC cut the prune manifest claims (every pruned layer at half its
MACs), the cut that actually runs sparse on torch (pruned AND converted by torch's plan, computed on CPU),
and top-1 on the digits test split (zoo model only; the timm models are random init: MACs only).

Part 2: the densify step on a TensorRT report for the zoo CNN. No TensorRT exists on this machine, so
the report is WRITTEN here, in TensorRT's log format, by the rule of thumb tensorrt.md records (sparse
kernels win only when input and output channels are both >= 256): the layers below that are "eligible but
not picked". The numbers measured are the layers returned and top-1 before and after (PyTorch, digits).

    .venv/bin/python benchmarks/densify_backend.py            # writes benchmarks/results/densify_backend.json
    .venv/bin/python benchmarks/densify_backend.py --smoke --out /tmp/x.json   # the zoo CNN only
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import provenance  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "densify_backend.json"
TIMM = {"resnet18": (3, 224, 224), "resnet50": (3, 224, 224)}
PICK_MIN_CHANNELS = 256  # tensorrt.md: sparse conv wins only when C and K are large, roughly >= 256


def loader(name: str, prov):
    """A factory of fresh LoadedModels (prune works in place)."""
    from mpdeploy.models.spec import LoadedModel

    if name == "digits_cnn":
        from mpdeploy.models.zoo import load_zoo_model

        prov.zoo(name)
        return lambda: load_zoo_model(name)
    import timm

    def make():
        torch.manual_seed(0)
        module = timm.create_model(name, pretrained=False).eval()
        return LoadedModel(module, TIMM[name], name, {"kind": "timm", "name": name, "kwargs": {}, "weights": "random"})

    prov.module(f"timm:{name}", make().module, "sha256 of the state dict (timm random init, torch.manual_seed(0))")
    return make


def torch_mac_cut(pruned_dir: Path) -> dict:
    """MACs that run sparse on torch: layers pruned AND converted by its plan (fp16, cuSPARSELt, conv1x1 large)."""
    from mpdeploy.backends.torch_sparse import plan_conversion
    from mpdeploy.core.kinds import open_weights
    from mpdeploy.sparsity.pruned import load_pruned

    weights = open_weights(pruned_dir)
    converted = {e["name"] for e in plan_conversion(load_pruned(pruned_dir, "sparse").model) if e["convert"]}
    layers = {r["name"]: r for r in weights.layers}
    saved = sum(r["macs"] - r["macs_executed"] for n, r in layers.items() if n in converted and r["runs_sparse"])
    return {"converted_layers": len(converted), "mac_cut_on_torch": saved / weights.totals["dense_macs"]}


def top1(pruned_dir: Path, which: str = "sparse") -> float:
    from mpdeploy.sparsity.pruned import load_pruned
    from mpdeploy.models.zoo import digits_top1

    art = load_pruned(pruned_dir, which)
    return digits_top1(art.model, art.input_shape)


def row(pruned_dir: Path, zoo: bool, seconds: float) -> dict:
    from mpdeploy.core.kinds import open_weights

    totals = open_weights(pruned_dir).totals
    out = {"pruned_layers": totals["pruned_layers"], "prune_seconds": round(seconds, 1),
           "mac_cut_claimed": totals["sparse_execution_mac_reduction"], **torch_mac_cut(pruned_dir)}
    if zoo:
        out["top1"] = top1(pruned_dir)
    return out


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def part1(name: str, make, work: Path) -> dict:
    from mpdeploy.densify.stage import DensifyConfig, densify
    from mpdeploy.prune.stage import PruneConfig, prune

    zoo = name == "digits_cnn"
    result: dict = {"input_shape": list(make().input_shape), "budget": "uniform", "saliency": "magnitude"}
    from mpdeploy.core.errors import MpdeployError

    for target in ("trt", "torch"):
        t0 = time.perf_counter()
        try:
            prune(make(), PruneConfig(budget="uniform", backend=target), work / name / target)
        except MpdeployError as exc:  # e.g. torch runs none of a ResNet-18's layers sparse: nothing to prune
            result[f"pruned_for_{target}"] = {"pruned_layers": 0, "mac_cut_claimed": 0.0, "mac_cut_on_torch": 0.0,
                                              "refused": str(exc), **({"top1": None} if zoo else {})}
            continue
        result[f"pruned_for_{target}"] = row(work / name / target, zoo, time.perf_counter() - t0)
    t0 = time.perf_counter()
    done = densify(work / name / "trt", DensifyConfig(backend="torch"), out=work / name / "densified")
    result["trt_pruned_densified_by_torch_plan"] = {
        "layers_returned": len(done.returned), "densify_seconds": round(time.perf_counter() - t0, 2),
        **(row(done.path, zoo, 0.0) if done.path else {}),
        "bit_identical_to_pruned_for_torch": same_weights(done.path, work / name / "torch")
        if done.path and (work / name / "torch").is_dir() else None}
    if zoo:
        result["top1_dense"] = top1(work / name / "trt", "dense")
    return result


def trt_log_by_rule(onnx_dir: Path, layers: list[dict]) -> tuple[str, list[str]]:
    """A TensorRT verbose log (Polygraphy's "[V] " capture) in which every pruned layer is eligible and those
    with both channel counts >= PICK_MIN_CHANNELS are picked. Returns (log, layers not picked)."""
    import json

    tensors = {t["layer"]: t["consumer"] for t in json.loads((onnx_dir / "sparsity.json").read_text())["tensors"]
               if t["runs_sparse"]}
    shape = {r["name"]: r["weight_shape"] for r in layers}
    picked = [n for n in tensors if min(shape[n][0], shape[n][1]) >= PICK_MIN_CHANNELS]
    log = ("[V] (Sparsity) Layers eligible for sparse math: " + ", ".join(tensors.values()) + "\n"
           "[V] (Sparsity) TRT inference plan picked sparse implementation for layers: "
           + ", ".join(tensors[n] for n in picked) + "\n")
    return log, sorted(set(tensors) - set(picked))


def part2(work: Path) -> dict:
    from mpdeploy.densify.stage import DensifyConfig, densify
    from mpdeploy.export.stage import ExportConfig, export
    from mpdeploy.core.kinds import open_weights

    pruned = work / "digits_cnn" / "trt"
    export(pruned, ExportConfig(), work / "digits_cnn" / "onnx")
    log, expected = trt_log_by_rule(work / "digits_cnn" / "onnx", open_weights(pruned).layers)
    (work / "trt.log").write_text(log)
    t0 = time.perf_counter()
    done = densify(work / "digits_cnn" / "onnx", DensifyConfig(trt_log=str(work / "trt.log")),
                   out=work / "digits_cnn" / "densified-trt")
    seconds = time.perf_counter() - t0
    returned = sorted(done.returned)
    return {"report": f"WRITTEN by the rule 'picked iff C_in and C_out >= {PICK_MIN_CHANNELS}' (tensorrt.md), in "
                      "TensorRT's log format: no TensorRT on this machine, so no TensorRT build decided these picks",
            "layers_pruned": len(done.evidence.ran_sparse) + len(returned), "layers_returned": len(returned),
            "returned": returned, "returned_as_the_report_says": returned == expected,
            "densify_seconds": round(seconds, 2), "top1_before": top1(pruned), "top1_after": top1(done.path),
            "top1_dense": top1(pruned, "dense"), "mac_cut_claimed_before": open_weights(pruned).totals[
                "sparse_execution_mac_reduction"], "mac_cut_claimed_after": open_weights(done.path).totals[
                "sparse_execution_mac_reduction"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,resnet18,resnet50")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="the zoo CNN only (tests run this)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models = "digits_cnn"
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    prov = provenance.begin(__file__, argv)
    results: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="densify-bench-") as tmp:
        work = Path(tmp)
        for name in [m for m in args.models.split(",") if m]:
            results["models"][name] = part1(name, loader(name, prov), work)
            print(name, results["models"][name], flush=True)
        if "digits_cnn" in results["models"]:
            results["densify_on_trt_report"] = part2(work)
            print(results["densify_on_trt_report"], flush=True)
    provenance.write_results(args.out, results, prov)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
