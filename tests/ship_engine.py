"""A tiny audited ONNX Runtime engine folder for the ship / Triton tests, built by hand per the engine contract.

`make_engine(root)` writes `root/engine-ort/{sparse,dense}.onnx` (a conv + linear net; the sparse one has
a 2:4 Linear, so the two really differ), the engine manifest (files table, self-hash, as mpdeploy writes
it) and a passed `audit/` tied to that engine by its manifest hash.
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


def write_engine_manifest(ed: Path, *, backend: str, precision: str, variants: dict, io: dict, device: dict) -> None:
    """The engine manifest, written the way mpdeploy writes one (files table, self-hash); no sources."""
    from mpdeploy.core import artifacts

    (ed / "manifest.json").unlink(missing_ok=True)
    extra = {"backend": backend, "precision": precision, "variants": variants, "io": io, "device": device,
             "file_sha256": {f: sha256(ed / f) for f in variants.values()}}
    artifacts.write_manifest(ed, "engine", {"backend": backend}, extra=extra)


def write_audit(root: Path, *, passed: bool, backend: str = "ort") -> None:
    """audit/ as `mpdeploy audit` leaves it: audit.json and a manifest whose engine source is engine-<backend>/
    with that engine manifest's hash (what ties the audit to the engine it audited)."""
    from mpdeploy.core import artifacts

    (root / "audit").mkdir(exist_ok=True)
    audit = {
        "schema": "mpdeploy.audit/1",
        "backend": backend,
        "passed": passed,
        "failures": [] if passed else ["top-1 drop 4.1 pts > 1.0"],
        "summary": {"top1_sparse": 0.91, "top1_dense": 0.92, "agreement": 0.97, "speedup_p50": {"1": 1.08}},
    }
    (root / "audit" / "audit.json").write_text(json.dumps(audit))
    (root / "audit" / "manifest.json").unlink(missing_ok=True)
    engine = root / f"engine-{backend}"
    artifacts.write_manifest(root / "audit", "audit", {}, inputs={"engine_manifest": artifacts.manifest_hash(engine)},
                             sources={"engine": engine}, extra={"backend": backend, "passed": passed})


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
    (ed / "build_report.json").write_text("{}")
    write_engine_manifest(
        ed, backend="ort", precision="fp32", variants={"sparse": "sparse.onnx", "dense": "dense.onnx"},
        io={"inputs": [{"name": "input", "dtype": "float32", "shape": [-1, *INPUT_SHAPE]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, NUM_CLASSES]}]},
        device={"name": "cpu", "gpu": None, "tensorrt_version": None})
    write_audit(root, passed=True)
    return root
