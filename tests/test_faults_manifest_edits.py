"""Single-field manifest edits over a real chain (issue 25): pruned -> onnx -> engine-ort -> audit -> ship.

Each edit changes one field of one manifest and recomputes its self-hash (as anyone with write access to
the folder can). The stage that reads that manifest next must then either refuse (exit 2, one line) or
produce exactly what it produces on the honest chain: the same ONNX / engine files, the same audit
verdict and accuracy numbers, the same shipped bytes. Stages further down are covered by the source
hashes (every later manifest records the edited one's hash), which `test_chain` checks.

The chain is one tiny build (timm:test_resnet, ORT, fp32, synthetic data) made once for the module. A
fast sample of fields runs by default; the sweep over every field is @pytest.mark.slow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mpdeploy.core import artifacts
from mpdeploy.cli import main as cli_main

MODEL_ARGS = ["timm:test_resnet", "--weights", "random", "--input-shape", "3,32,32", "--num-classes", "10"]
BUILD = ["--sparse", "--backend", "ort", "--precision", "fp32", "--threads", "1", "--calib", "synthetic",
         "--calib-batches", "1", "--batch-sizes", "1", "--max-eval-images", "16", "--warmup", "0", "--repeats", "1",
         "--sensitivity-batch", "0", "--no-plots", "--max-top1-drop", "1.0", "--eval-data", "synthetic"]
AUDIT = ["--backend", "ort", "--data", "synthetic", "--max-eval-images", "16", "--repeats", "1", "--warmup", "0",
         "--no-plots", "--sensitivity-batch", "0", "--batch-sizes", "1", "--max-top1-drop", "1.0"]
# Audit numbers that do not depend on timing: what an edit must leave as the honest chain has them.
AUDIT_KEYS = ("agreement", "top1_dense", "top1_sparse", "max_logit_error", "weights_nm_compliant", "pattern",
              "mac_reduction", "eval_images")


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# The export records the hash of the pruned manifest it read (in sparsity.json and the ONNX metadata):
# that hash differs after any manifest edit by design; everything else must not.
_SOURCE_HASH = "source_pruned_manifest_sha256"


def _without_source_hash(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != _SOURCE_HASH}


def _onnx_content(path: Path) -> tuple:
    """(graph bytes, metadata without the source hash) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: _without_source_hash(json.loads(p.value)) if p.key == "mpdeploy.sparsity" else p.value
            for p in model.metadata_props}
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest(), json.dumps(meta, sort_keys=True)


def run_next_stage(kind_dir: str, root: Path, out: Path) -> tuple[int, str]:
    """Run the stage that reads `root/kind_dir` next; returns (exit code, stderr-less outcome key)."""
    argv = {
        "pruned": ["export", str(root / "pruned"), "--out", str(out)],
        "onnx": ["engine", str(root / "onnx"), "--backend", "ort", "--precision", "fp32", "--threads", "1",
                 "--out", str(out)],
        "engine-ort": ["audit", str(root), *AUDIT],
        "audit": ["ship", str(root), "--repo", str(out)],
    }[kind_dir]
    return cli_main(["-q", *argv])


def outcome(kind_dir: str, root: Path, out: Path) -> dict:
    """What the next stage produced, in the terms an honest run is compared in."""
    if kind_dir == "pruned":
        return {**{f: _onnx_content(out / f) for f in ("model.onnx", "model.dense.onnx")},
                "sparsity.json": _without_source_hash(json.loads((out / "sparsity.json").read_text()))}
    if kind_dir == "onnx":
        return {f: _sha(out / f) for f in ("sparse.onnx", "dense.onnx")}
    if kind_dir == "engine-ort":
        audit = json.loads((root / "audit" / "audit.json").read_text())
        return {"passed": audit["passed"], **{k: audit["summary"].get(k) for k in AUDIT_KEYS}}
    shipped = next(out.glob("*/1"))
    return {"model": _sha(shipped / "model.onnx"), "config": _sha(shipped.parent / "config.pbtxt")}


def leaf_paths(obj, path=()):
    """Paths to every scalar (and empty container) of a JSON document."""
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            yield from leaf_paths(value, (*path, key))
    elif isinstance(obj, list) and obj:
        for i, value in enumerate(obj):
            yield from leaf_paths(value, (*path, i))
    else:
        yield path


def edited(value):
    """One plausible single-field change of `value` (what a hand edit or a forger would write)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    if value is None:
        return 1
    return {"x": 1} if isinstance(value, dict) else [1]


def apply_edit(folder: Path, path: tuple) -> None:
    manifest_path = folder / artifacts.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = edited(target[path[-1]])
    manifest[artifacts.SELF_HASH] = artifacts._self_hash(manifest)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, dict]:
    """(the honest chain, the honest outcome of every next stage)."""
    root = tmp_path_factory.mktemp("edits") / "chain"
    assert cli_main(["-q", "build", *MODEL_ARGS, *BUILD, "--out", str(root)]) == 0
    honest = {}
    for kind_dir in ("pruned", "onnx", "engine-ort", "audit"):
        work = tmp_path_factory.mktemp(f"honest-{kind_dir}")
        shutil.copytree(root, work / "chain")
        assert run_next_stage(kind_dir, work / "chain", work / "out") == 0
        honest[kind_dir] = outcome(kind_dir, work / "chain", work / "out")
    return root, honest


def check_edit(chain, tmp_path, capsys, kind_dir: str, path: tuple) -> None:
    root, honest = chain
    work = tmp_path / "chain"
    shutil.copytree(root, work)
    apply_edit(work / kind_dir, path)
    capsys.readouterr()
    code = run_next_stage(kind_dir, work, tmp_path / "out")
    err = capsys.readouterr().err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, (path, err)
        return
    assert code == 0, f"{kind_dir} {path}: exit {code} where the honest chain gives 0\n{err}"
    got = outcome(kind_dir, work, tmp_path / "out")
    assert got == honest[kind_dir], f"{kind_dir} {path}: accepted, and produced something else"


def _all_edits(root: Path) -> list[tuple[str, tuple]]:
    edits = []
    for kind_dir in ("pruned", "onnx", "engine-ort", "audit"):
        manifest = json.loads((root / kind_dir / artifacts.MANIFEST).read_text())
        for path in leaf_paths(manifest):
            if not path or path[0] == artifacts.SELF_HASH:
                continue
            # The per-layer records of a pruned manifest repeat one schema: the first and last layer
            # stand for all of them (every field of each is edited).
            if kind_dir == "pruned" and path[0] == "layers" and path[1] not in (0, len(manifest["layers"]) - 1):
                continue
            edits.append((kind_dir, path))
    return edits


# The fast sample: fields a stage acts on (what to import, which file is which, what passed) and a
# harmless one per manifest.
SAMPLE = [
    ("pruned", ("model", "source", "kind")),
    ("pruned", ("model", "source", "name")),
    ("pruned", ("layers", 0, "pattern")),
    ("pruned", ("created",)),
    ("pruned", ("model", "input_shape", 2)),  # found by the sweep: export followed it (an ONNX of another size)
    ("onnx", ("sources", "weights", "path")),
    ("onnx", ("config", "opset")),
    ("engine-ort", ("variants", "sparse")),
    ("engine-ort", ("backend",)),
    ("engine-ort", ("io", "inputs", 0, "shape", 1)),
    ("engine-ort", ("runtime", "backend_options")),  # found by the sweep: was a TypeError traceback in audit
    ("engine-ort", ("io", "outputs", 0, "shape", 1)),  # found by the sweep: was a failed audit, not a refusal
    ("audit", ("passed",)),
    ("audit", ("backend",)),
    ("audit", ("sources", "engine", "manifest_sha256")),
]


@pytest.mark.parametrize("kind_dir,path", SAMPLE, ids=[f"{k}:{'.'.join(map(str, p))}" for k, p in SAMPLE])
def test_single_field_edit_sample(chain, tmp_path, capsys, kind_dir, path):
    check_edit(chain, tmp_path, capsys, kind_dir, path)


@pytest.mark.slow
def test_every_single_field_edit(chain, tmp_path, capsys):
    root, _ = chain
    failures = []
    for i, (kind_dir, path) in enumerate(_all_edits(root)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        try:
            check_edit(chain, case, capsys, kind_dir, path)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0])
        except Exception as exc:  # noqa: BLE001 - a traceback is a defect too: collect it, go on
            failures.append(f"{kind_dir} {path}: {type(exc).__name__}: {exc} (a traceback, not one line)")
        finally:
            shutil.rmtree(case, ignore_errors=True)
    assert not failures, f"{len(failures)} edits accepted with another result:\n" + "\n".join(failures)


def test_edit_helpers_change_exactly_one_field(chain, tmp_path):
    root, _ = chain
    shutil.copytree(root / "audit", tmp_path / "audit")
    before = json.loads((tmp_path / "audit" / artifacts.MANIFEST).read_text())
    apply_edit(tmp_path / "audit", ("passed",))
    after = json.loads((tmp_path / "audit" / artifacts.MANIFEST).read_text())
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"passed", artifacts.SELF_HASH} and after["passed"] is (not before["passed"])
    expected = copy.deepcopy(after)
    artifacts.verify_self(tmp_path / "audit", expected)  # the forgery passes the self-hash check


def test_forced_ship_without_an_audit_checks_io_against_the_onnx(chain, tmp_path, capsys):
    # No audit to tie the engine manifest to: ship itself must not believe an edited `io` (Triton's config
    # is written from it).
    root, _ = chain
    work = tmp_path / "chain"
    shutil.copytree(root, work)
    shutil.rmtree(work / "audit")
    apply_edit(work / "engine-ort", ("io", "inputs", 0, "shape", 2))
    capsys.readouterr()
    code = cli_main(["-q", "ship", str(work), "--repo", str(tmp_path / "repo"), "--force"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "io.inputs" in err[0] and "model.onnx" in err[0], err
    assert not (tmp_path / "repo").exists()
