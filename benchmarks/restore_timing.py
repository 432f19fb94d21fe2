"""Prune-restore speed and quality: the OBS solver (default) against the exact per-row least squares.

Run: python benchmarks/restore_timing.py [--smoke]  ->  benchmarks/results/restore_timing[_smoke].json

Per model (timm, random init; calibration = N(0,1) noise images, as `--calib synthetic`):
1. wall and CPU seconds of `restore_layers` (uniform 2:4 magnitude masks on every eligible layer,
   one forward pass, the sequential scheme) with the default `obs` solver;
2. on a few layers whose exact solve is affordable, the held-out relative output error of the dense
   model's inputs after: no refit, the exact per-row ridge solve (the reference, the old default),
   the bare OBS sweep, and OBS + the default conjugate-gradient steps.
Goal (issue 18): ResNet50 and ViT-B/16 restore <= 60 s each on 2 cores; error within a few percent
of the exact solve. Each model runs in its own subprocess so CPU seconds are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import provenance

FULL = {"resnet50": ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv1", "layer4.0.conv1"],
        "vit_base_patch16_224": ["blocks.0.attn.qkv", "blocks.5.attn.proj"]}
SMOKE = {"resnet18": ["layer1.0.conv1", "layer2.0.conv2"], "vit_tiny_patch16_224": ["blocks.0.attn.qkv", "blocks.0.mlp.fc2"]}


def run_one(name: str, layers: list[str], calib_images: int, held_images: int, threads: int) -> dict:
    import timm
    import torch

    from mpdeploy.sparsity.layers import find_layers, skip_reason
    from mpdeploy.sparsity.obs import refine_masked_ridge  # noqa: F401  (imported so its load is not timed)
    from mpdeploy.sparsity.patterns import NM
    from mpdeploy.sparsity.restore import (CG_STEPS, DEFAULT_DAMP, gram_of, refit_obs, refit_rows, relative_error,
                                  restore_layers)
    from mpdeploy.sparsity.saliency import compute_mask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    model_sha256 = provenance.state_dict_sha256(model)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(calib_images + held_images, 3, 224, 224, generator=g)
    calib, held = list(images[:calib_images].split(8)), list(images[calib_images:].split(8))
    eligible = [layer for layer in find_layers(model) if skip_reason(layer, NM(2, 4), False) is None]
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # layer-level comparison on the dense model's inputs
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: inputs.__setitem__(n, i[0].detach())) for n in layers]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    compare = {}
    for n in layers:
        module = model.get_submodule(n)
        gen = torch.Generator().manual_seed(0)
        h_fit, rows = gram_of(module, inputs[n][:calib_images], 8, gen)
        h_held, rows_held = gram_of(module, inputs[n][calib_images:], 8, gen)
        h_fit, h_held = h_fit / rows, h_held / rows_held
        dense = module.weight.detach().reshape(module.weight.shape[0], -1).double()
        mask = compute_mask(module.weight, NM(2, 4), "magnitude").reshape(dense.shape[0], -1)
        lam = DEFAULT_DAMP * float(torch.diagonal(h_fit).mean())
        entry = {"weight_shape": list(module.weight.shape), "calib_rows": rows,
                 "masked": relative_error(dense * mask, dense, h_held)}
        for label, fn in (("exact", lambda: refit_rows(dense, mask, h_fit, lam)),
                          ("obs_sweep_only", lambda: refit_obs(dense, mask, h_fit, lam, module.weight.shape, 0)),
                          (f"obs_cg{CG_STEPS}", lambda: refit_obs(dense, mask, h_fit, lam, module.weight.shape))):
            t0, c0 = time.perf_counter(), time.process_time()
            w = fn()
            entry[label] = relative_error(w, dense, h_held)
            entry[f"{label}_s"] = {"wall": round(time.perf_counter() - t0, 3), "cpu": round(time.process_time() - c0, 3)}
        entry["obs_vs_exact"] = entry[f"obs_cg{CG_STEPS}"] / entry["exact"] if entry["exact"] > 0 else None
        compare[n] = entry
        print(name, n, {k: v for k, v in entry.items() if not k.endswith("_s")}, flush=True)

    masks = {}
    with torch.no_grad():
        for layer in eligible:
            weight = model.get_submodule(layer.name).weight
            masks[layer.param_name] = compute_mask(weight, NM(2, 4), "magnitude")
            weight.mul_(masks[layer.param_name])
    t0, c0 = time.perf_counter(), time.process_time()
    report = restore_layers(model, masks, calib, held, dense_state=dense_state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    improved = sum(1 for e in report.values() if e["improved"])
    slowest = sorted(((e.get("seconds", 0.0), n) for n, e in report.items()), reverse=True)[:3]
    return {"restore_wall_s": round(wall, 2), "restore_cpu_s": round(cpu, 2), "layers": len(report),
            "layers_improved": improved, "slowest_layers_wall_s": [[n, round(s, 2)] for s, n in slowest],
            "calib_images": calib_images, "held_out_images": held_images, "torch_threads": threads,
            "layer_error_comparison": compare, "model_sha256": model_sha256}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small models, few images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-images", type=int, default=None)
    parser.add_argument("--held-images", type=int, default=None)
    parser.add_argument("--models", default=None, help="comma list (default: all); results merge into the JSON")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: benchmarks/results/restore_timing[_smoke].json; other models' rows kept)")
    parser.add_argument("--note", default="2-core machine; each model records its load average: wall seconds grow "
                        "with other work, CPU seconds (process_time, all threads) are the steadier number",
                        help="what else ran on the machine (goes into the JSON)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = SMOKE if args.smoke else FULL
    if args.models:
        models = {name: models[name] for name in args.models.split(",")}
    calib_images = args.calib_images or (4 if args.smoke else 16)
    held_images = args.held_images or (2 if args.smoke else 8)
    if args.child:
        name = args.child[0]
        print("RESULT " + json.dumps(run_one(name, models[name], calib_images, held_images, args.threads)))
        return
    prov = provenance.begin(__file__)
    results = {"command": "python benchmarks/restore_timing.py" + (" --smoke" if args.smoke else ""),
               "note": args.note,
               "config": {"pattern": "2:4", "saliency": "magnitude", "budget": "uniform", "init": "timm random",
                          "calib": "N(0,1) noise images 3x224x224"},
               "goal": "restore <= 60 s on 2 cores for resnet50 and vit_base_patch16_224; error within a few % of exact",
               "models": {}}
    path = args.out or Path(__file__).parent / "results" / ("restore_timing_smoke.json" if args.smoke else "restore_timing.json")
    if path.exists():  # keep the other models' measurements (each records its own provenance)
        old = json.loads(path.read_text())
        results["models"] = {n: {"provenance": old.get("provenance", old.get("machine")), **r}
                             for n, r in old.get("models", {}).items() if n not in models}
    for name in models:
        cmd = [sys.executable, __file__, "--child", name, "x", "--threads", str(args.threads),
               "--calib-images", str(calib_images), "--held-images", str(held_images)]
        if args.smoke:
            cmd.append("--smoke")
        run = provenance.run_child(cmd)  # peak RSS of this child alone
        if run.returncode != 0:
            raise SystemExit(f"restore of {name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
        print(run.stdout)
        line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
        record = json.loads(line[len("RESULT "):])
        prov.model(f"timm:{name}", record.pop("model_sha256"), "sha256 of the random-init state dict (seed 0)")
        results["models"][name] = {**record, **run.record()}
    provenance.write_results(path, results, prov)
    print(json.dumps({n: {k: v for k, v in r.items() if k != "layer_error_comparison"} for n, r in results["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
