"""`mpdeploy export` on random-init timm models pruned 2:4: every pruned tensor eligible, 2:4, and confirmed
by Polygraphy's own sparsity checker; ONNX Runtime vs PyTorch.

Run: .venv/bin/python benchmarks/export_checks.py [--models NAME[+tomeR],...] [--smoke]
  ->  benchmarks/results/export_checks.json (--smoke: test_resnet, test_vit+tome2; under /tmp unless --out)

Per model (timm, random init from seed 0, `prune --budget uniform --pattern 2:4`, optional ToMe r, legacy
exporter, opset 18): the export's own record (sparsity.json: annotated tensors, eligible for TensorRT's
2:4 placement rules, ONNX Runtime vs PyTorch max |diff| at batches 2 and 1), then Polygraphy's
checker on model.onnx, through its Python API exactly as `polygraphy inspect sparsity` runs it
(`SparsityPruner._walk_nodes` + `process_tensor(check=True)`): how many tensors it checked, how many it
found 2:4, how many of the annotated 2:4 tensors it confirms, and whether it agrees with our checker
tensor by tensor. Polygraphy's check is pure Python: minutes on ViT-B/16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import provenance

RESULTS = provenance.RESULTS / "export_checks.json"
MODELS = ("vit_base_patch16_224", "resnet50", "convnextv2_base", "vit_tiny_patch16_224+tome8")
SMOKE = ("test_resnet", "test_vit+tome2")


def polygraphy_verdict(model_path: Path) -> tuple[dict[str, int], set[str], float]:
    """({tensor: axis} Polygraphy checks, {tensors it finds 2:4}, seconds): `polygraphy inspect sparsity`."""
    import onnx
    from polygraphy.logger import G_LOGGER
    from polygraphy.tools.sparse import SparsityPruner, process_tensor

    proto = onnx.load(str(model_path))
    t0 = time.perf_counter()
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        pruner = SparsityPruner(proto)
        infos = pruner._walk_nodes()
        inits = {t.name: t for t in proto.graph.initializer}
        sparse = {i.name for i in infos if process_tensor(i, inits[i.name], True)}
    return {i.name: i.axis for i in infos}, sparse, time.perf_counter() - t0


def check_model(spec: str, work: Path, prov: provenance.Provenance) -> dict:
    import torch

    from mpdeploy.export.stage import ExportConfig, export
    from mpdeploy.models.load import load_model
    from mpdeploy.models.spec import ModelSpec
    from mpdeploy.prune.stage import PruneConfig, prune

    name, _, tome = spec.partition("+tome")
    torch.manual_seed(0)
    loaded = load_model(ModelSpec(f"timm:{name}", weights="random"))
    prov.module(f"timm:{name}", loaded.module, "sha256 of the random-init state dict (seed 0)")
    t0 = time.perf_counter()
    pruned = prune(loaded, PruneConfig(budget="uniform", pattern="2:4", tome=int(tome or 0)), work / spec / "pruned")
    onnx_dir = export(pruned, ExportConfig(exporter="legacy"), work / spec / "onnx")
    export_s = time.perf_counter() - t0
    record = json.loads((onnx_dir / "sparsity.json").read_text())
    annotated_24 = {t["initializer"] for t in record["tensors"] if t["pattern"] == "2:4"}
    ours_checked = {t["initializer"]: t["axis"] for t in record["tensors"] if t["eligible"]}
    ours_checked |= {k: v["axis"] for k, v in record["unannotated_checked"].items() if v["eligible"]}
    ours_24 = {t["initializer"] for t in record["tensors"] if t["eligible"] and t["is_2_4"]}
    ours_24 |= {k for k, v in record["unannotated_checked"].items() if v["eligible"] and v["is_2_4"]}
    poly_checked, poly_24, poly_s = polygraphy_verdict(onnx_dir / "model.onnx")
    return {
        "model": name, "tome_r": int(tome or 0), "exporter": record["exporter"], "opset": record["opset"],
        "input_shape": list(loaded.input_shape),
        "annotated_2_4": len(annotated_24),
        "eligible_2_4": sum(t["eligible"] and t["is_2_4"] for t in record["tensors"] if t["pattern"] == "2:4"),
        "polygraphy_checked": len(poly_checked), "polygraphy_sparse": len(poly_24),
        "polygraphy_confirmed_2_4": len(annotated_24 & poly_24),
        "checker_polygraphy_agree": ours_checked == poly_checked and ours_24 == poly_24,
        "ort_max_abs_diff_sparse": record["ort_check"]["max_abs_diff_sparse"],
        "ort_max_abs_diff_dense": record["ort_check"]["max_abs_diff_dense"],
        "ort_batches": record["ort_check"]["batches"],
        "prune_export_s": round(export_s, 1), "polygraphy_s": round(poly_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma list (default: {','.join(MODELS)})")
    parser.add_argument("--smoke", action="store_true", help=f"{', '.join(SMOKE)} (seconds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = args.models.split(",") if args.models else list(SMOKE if args.smoke else MODELS)
    out = args.out or (Path(tempfile.mkdtemp(prefix="export_checks_")) / "export_checks.json" if args.smoke
                       else RESULTS)
    import torch

    torch.set_num_threads(1)
    prov = provenance.begin(__file__, argv)
    results = {"what": "random-init timm models, prune --budget uniform --pattern 2:4 [+ ToMe r], export "
                       "(legacy exporter, opset 18); Polygraphy = its `inspect sparsity` checker",
               "models": {}}
    with tempfile.TemporaryDirectory(prefix="export_checks_") as tmp:
        for spec in models:
            results["models"][spec] = row = check_model(spec, Path(tmp), prov)
            print(json.dumps(row), flush=True)
            provenance.write_results(out, results, prov)  # after every model: a long run keeps what it has
    print(f"wrote {out}")
    bad = [m for m, r in results["models"].items()
           if not (r["checker_polygraphy_agree"] and r["polygraphy_confirmed_2_4"] == r["annotated_2_4"])]
    if bad:
        print(f"Polygraphy does not confirm every pruned tensor of {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
