"""`mpdeploy audit` over a generated ImageFolder (default 50,000 JPEGs, 1,000 classes): time and peak memory.

Run: .venv/bin/python benchmarks/audit_imagefolder.py [--images 50000] [--smoke]
  ->  benchmarks/results/audit_imagefolder.json (--smoke: 200 images, result under /tmp unless --out)

Goal (issue 17): the audit streams the evaluation set, so peak memory stays under 2 GiB however many
images there are. The images are small generated JPEGs (written under /tmp, never into the repo); the
engine is timm:test_resnet (random init, 1,000 outputs) built with --no-audit at 64x64, so the run
measures the streaming path (decode, DataLoader workers, both engines, per-image metrics), not a big
network. Peak memory is sampled every 50 ms over the audit process and all its DataLoader workers
(PSS from /proc/PID/smaps_rollup, summed), beside the audit process's own peak RSS (os.wait4's
rusage of that one process: its largest reaped worker counts, the earlier build does not). The audit runs with --time-budget 0, so every image is evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import provenance

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "audit_imagefolder.json"
GOAL_PEAK_MIB = 2048
CLASSES = 1000
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def make_image_folder(root: Path, images: int, classes: int, side: int = 80) -> float:
    """`images` JPEGs of `side` px spread over `classes` folders; returns the seconds it took."""
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, 8, 8, 3), dtype=np.uint8)  # one colour pattern per class
    for c in range(classes):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % classes
        tile = np.kron(base[c], np.ones((side // 8, side // 8, 1), np.uint8))
        noisy = np.clip(tile.astype(np.int16) + rng.integers(-20, 21, tile.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"c{c:04d}" / f"{i:06d}.jpg", quality=85)
    return time.perf_counter() - t0


def _tree_pss_mib(pid: int) -> float:
    """PSS of `pid` and all its descendants, from /proc (PSS splits pages a forked DataLoader worker
    shares with its parent, so the sum is the memory the tree really holds; RSS would count them twice)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return total


def run_sampled(argv: list[str], log: Path, timeout_s: float) -> dict:
    """Run a command, sampling its process tree's RSS every 50 ms."""
    peak = [0.0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_pss_mib(proc.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        deadline = time.monotonic() + timeout_s
        rc: int | str = "timeout"
        while True:  # os.wait4: the rusage of this one process (and its reaped workers), not a running max
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                break
            time.sleep(0.05)
        done.set()
        sampler.join()
    return {"returncode": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_pss_mib_tree_sampled": round(peak[0]), "peak_rss_mib_audit_process": round(usage.ru_maxrss / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--smoke", action="store_true", help="200 images, 10 classes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--note", default="2-core machine shared with other jobs at the time: wall time is "
                        "inflated, see loadavg", help="what else ran on the machine (goes into the JSON)")
    args = parser.parse_args(argv)
    images, classes = (200, 10) if args.smoke else (args.images, CLASSES)
    out_json = args.out or (Path(tempfile.mkdtemp(prefix="audit_if_")) / "audit_imagefolder.json" if args.smoke else RESULTS)
    prov = provenance.begin(__file__, argv)
    with tempfile.TemporaryDirectory(prefix="audit_imagefolder_") as tmp:
        tmp = Path(tmp)
        gen_s = make_image_folder(tmp / "images", images, classes)
        engine = tmp / "engine"
        build = [sys.executable, "-m", "mpdeploy", "build", "timm:test_resnet", "--sparse", "--backend", "ort",
                 "--no-audit", "--weights", "random", "--input-shape", "3,64,64", "--batch-sizes", "32",
                 "--out", str(engine)]
        built = subprocess.run(build, env=ENV, capture_output=True, text=True)
        if built.returncode != 0:
            print(built.stderr[-2000:], file=sys.stderr)
            return 1
        audit = [sys.executable, "-m", "mpdeploy", "audit", str(engine), "--data", str(tmp / "images"),
                 "--batch-sizes", "32", "--time-budget", "0"] + (["--no-plots"] if args.smoke else [])
        load0 = [round(v, 2) for v in os.getloadavg()]
        run = run_sampled(audit, tmp / "audit.log", args.timeout)
        log_lines = (tmp / "audit.log").read_text(errors="replace").splitlines()
        prov.model("timm:test_resnet", provenance.build_model_sha256(engine))
        report_path = engine / "audit" / "audit.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
        "note": args.note,
        "command": "python benchmarks/audit_imagefolder.py" + (" --smoke" if args.smoke else f" --images {images}"),
        "images": images, "classes": classes, "jpeg_side_px": 80, "engine": "timm:test_resnet random init, 3x64x64, ort",
        "generate_jpegs_s": round(gen_s, 1), "audit": run, "loadavg_before": load0,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()], "goal_peak_mib": GOAL_PEAK_MIB,
        "within_goal_memory": run["peak_pss_mib_tree_sampled"] <= GOAL_PEAK_MIB,
        "evaluated_images": (report.get("summary") or {}).get("eval_images"),
        "audit_steps_s": report.get("timings"), "audit_seconds": report.get("seconds"),
        "progress_lines": sum("ETA" in line or "done in" in line for line in log_lines),
        "log_tail": log_lines[-5:],
    }
    record = provenance.write_results(out_json, record, prov)
    print(json.dumps({k: record[k] for k in ("images", "audit", "evaluated_images")}))
    print(f"wrote {out_json}")
    return 0 if run["returncode"] in (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main())
