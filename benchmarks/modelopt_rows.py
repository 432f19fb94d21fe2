"""ModelOpt's 2:4 rows (`sparse_magnitude`, `sparsegpt`) for the method table, in ModelOpt's own venv.

    python benchmarks/modelopt_rows.py --modelopt-python /tmp/mo-venv/bin/python [--models digits_vit,digits_cnn]

ModelOpt (`nvidia-modelopt`) is never a project dependency: it lives in its own venv (created with
`python -m venv /tmp/mo-venv && /tmp/mo-venv/bin/pip install nvidia-modelopt requests timm safetensors`).
This script (project venv) writes each zoo model's weights and the digits tensors to a temporary folder,
runs CHILD in the ModelOpt venv (timm + ModelOpt only), and records top-1 on the digits test split and
the share of Linear/Conv2d MACs-by-weight that ModelOpt made 2:4 sparse. Writes
benchmarks/results/modelopt_rows.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import provenance  # noqa: E402  (benchmarks/provenance.py, beside this script)

CHILD = r'''
import json, sys, time, copy, torch, timm
from safetensors.torch import load_file
torch.set_num_threads(1)
spec = json.loads(open(sys.argv[1]).read())
data = torch.load(spec["data"], weights_only=True)
model = timm.create_model(spec["arch"], pretrained=False, **spec["kwargs"]).eval()
model.load_state_dict(load_file(spec["weights"]))
import modelopt.torch.sparsity as mts
calib = list(data["calib"].split(16))
def top1(m):
    with torch.no_grad():
        return float((m(data["test_x"]).argmax(-1) == data["test_y"]).float().mean())
out = {"dense": top1(model)}
for mode in ("sparse_magnitude", "sparsegpt"):
    m = copy.deepcopy(model)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        m = mts.sparsify(m, mode=mode, config={"data_loader": calib, "collect_func": lambda b: b})
        total = sparse = 0
        for mod in m.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                w = mod.weight.detach()
                total += w.numel()
                if float((w == 0).float().mean()) >= 0.49:
                    sparse += w.numel()
        out[mode] = {"top1": top1(m), "weights_in_sparse_layers": sparse / max(1, total),
                     "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    except Exception as exc:
        out[mode] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
print("RESULT " + json.dumps(out))
'''


def modelopt_versions(python: str) -> dict:
    """ModelOpt's, torch's and timm's versions inside ModelOpt's own venv (the ones that made the rows)."""
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('nvidia-modelopt', 'torch', 'timm')}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}


def main() -> None:
    from safetensors.torch import save_file

    from mpdeploy.models.data import digits_tensors
    from mpdeploy.models.zoo import zoo_entry, load_zoo_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from method_table import EXTRA, train_extra  # the benchmark's own trained models, same cache

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modelopt-python", required=True)
    parser.add_argument("--models", default="digits_vit,digits_cnn,vit6x128,resnet18_1ch")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mpdeploy_method_table"),
                        help="where method_table.py keeps the models it trains (trained here if absent)")
    parser.add_argument("--note", default="CPU, 1 thread, 2-core machine; calibration 128 digits images")
    args = parser.parse_args()
    path = Path(__file__).resolve().parent / "results" / "modelopt_rows.json"
    prov = provenance.begin(__file__)
    venv = {"python": args.modelopt_python, "versions": modelopt_versions(args.modelopt_python)}
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_1m": round(os.getloadavg()[0], 2),
               "note": args.note, "modelopt_venv": venv, "models": {}}
    if path.exists():  # keep the other models' rows (each records when it ran)
        results["models"] = json.loads(path.read_text()).get("models", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name in EXTRA:
                loaded = train_extra(name, args.cache)
                arch, kwargs = EXTRA[name][0], EXTRA[name][1]
                prov.module(name, loaded.module, "trained by method_table.py: sha256 of its state dict")
            else:
                loaded = load_zoo_model(name)
                arch, kwargs = zoo_entry(name).arch, zoo_entry(name).kwargs
                prov.zoo(name)
            x, y = digits_tensors(loaded.input_shape, "test")
            calib, _ = digits_tensors(loaded.input_shape, "calib")
            torch.save({"test_x": x, "test_y": y, "calib": calib[:128]}, f"{tmp}/{name}.pt")
            save_file({k: v.contiguous() for k, v in loaded.module.state_dict().items()}, f"{tmp}/{name}.safetensors")
            spec = {"arch": arch, "kwargs": dict(kwargs), "weights": f"{tmp}/{name}.safetensors",
                    "data": f"{tmp}/{name}.pt"}
            Path(f"{tmp}/{name}.json").write_text(json.dumps(spec))
            Path(f"{tmp}/child.py").write_text(CHILD)
            proc = subprocess.run([args.modelopt_python, f"{tmp}/child.py", f"{tmp}/{name}.json"],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            results["models"][name] = (json.loads(line[7:]) if line else
                                       {"error": f"not measured here: exit {proc.returncode}: {proc.stderr[-500:]}"})
            results["models"][name]["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            results["models"][name]["modelopt_venv"] = venv
            results["models"][name]["model_sha256"] = prov.models[name if name in EXTRA else f"zoo:{name}"]["sha256"]
            print(name, results["models"][name], flush=True)
    provenance.write_results(path, results, prov)


if __name__ == "__main__":
    main()
