"""A tiny audited ONNX Runtime engine folder for the ship / Triton tests, built by hand per the engine contract.

`make_engine(root)` writes `root/engine-ort/{sparse,dense}.onnx` (a conv + linear net; the sparse one has
a 2:4 Linear, so the two really differ), the engine manifest and a passed `audit/audit.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

INPUT_SHAPE = (3, 16, 16)  # per sample; the batch dim is dynamic
NUM_CLASSES = 10


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    torch.onnx.export(
        model,
        torch.randn(1, *INPUT_SHAPE),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_audit(root: Path, *, passed: bool, backend: str = "ort") -> None:
    (root / "audit").mkdir(exist_ok=True)
    audit = {
        "schema": "mpdeploy.audit/1",
        "backend": backend,
        "passed": passed,
        "failures": [] if passed else ["top-1 drop 4.1 pts > 1.0"],
        "summary": {"top1_sparse": 0.91, "top1_dense": 0.92, "agreement": 0.97, "speedup_p50": {"1": 1.08}},
    }
    (root / "audit" / "audit.json").write_text(json.dumps(audit))
    from mpdeploy import artifacts  # ship opens the audit through its verified artifact: give it a manifest

    (root / "audit" / "manifest.json").unlink(missing_ok=True)
    artifacts.write_manifest(root / "audit", "audit", {}, extra={"backend": backend, "passed": passed})


def make_engine(root: Path) -> Path:
    """engines/<name> with engine-ort/{sparse,dense}.onnx, manifest and a passed audit; returns `root`."""
    torch.manual_seed(0)
    dense = Tiny().eval()
    sparse = Tiny().eval()
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():  # 2:4 along `in` on the Linear
        w = sparse.fc.weight.view(NUM_CLASSES, 2, 4)
        keep = w.abs().topk(2, dim=-1).indices
        sparse.fc.weight.copy_((w * torch.zeros_like(w).scatter_(-1, keep, 1.0)).view(NUM_CLASSES, 8))

    ed = root / "engine-ort"
    ed.mkdir(parents=True)
    export_onnx(sparse, ed / "sparse.onnx")
    export_onnx(dense, ed / "dense.onnx")
    manifest = {
        "schema": "mpdeploy.engine/1",
        "kind": "engine",
        "backend": "ort",
        "precision": "fp32",
        "variants": {"sparse": "sparse.onnx", "dense": "dense.onnx"},
        "io": {
            "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, *INPUT_SHAPE]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, NUM_CLASSES]}],
        },
        "device": {"name": "cpu", "gpu": None, "tensorrt_version": None},
        "sources": {"onnx_sha256": "a" * 64, "pruned_manifest_sha256": "b" * 64},
        "file_sha256": {f: sha256(ed / f) for f in ("sparse.onnx", "dense.onnx")},
    }
    (ed / "manifest.json").write_text(json.dumps(manifest))
    (ed / "build_report.json").write_text("{}")
    write_audit(root, passed=True)
    return root
