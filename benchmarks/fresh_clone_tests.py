"""`make test` on a fresh clone of the committed tree: summary line and time, appended to a results file.

Run: .venv/bin/python benchmarks/fresh_clone_tests.py [--hog] [--note TEXT]  ->  benchmarks/results/test_suite.json

Clones HEAD (committed files only: what a new user gets) into a temporary folder, runs `make test` there
(it creates its own .venv and installs everything, so the time includes the install), and records
pytest's final summary ("N passed, M skipped in T"), the exit code and the wall time. `--hog` runs a
CPU-bound process beside it for the whole run (the issue's "one of them with a CPU-bound process running
beside it"). Each run is appended: the file keeps every run, each with its own provenance.
`--smoke` runs `pytest --collect-only -q tests/test_patterns.py` in the clone with this venv instead
(seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance

RESULTS = provenance.RESULTS / "test_suite.json"
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|error).*? in [\d.]+s.*?)\s*=*$", re.M)
# pytest's -ra short summary (addopts): one line per failed / errored / skipped test, kept by name
OUTCOME_LINES = re.compile(r"^(?:FAILED|ERROR|SKIPPED) .*$", re.M)


def clone(target: Path) -> str:
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(provenance.REPO), str(target)], check=True)
    return subprocess.run(["git", "-C", str(target), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hog", action="store_true", help="a CPU-bound process runs beside the tests")
    parser.add_argument("--note", default=None, help="what else ran on the machine")
    parser.add_argument("--smoke", action="store_true", help="collect one test file with this venv (seconds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or RESULTS
    prov = provenance.begin(__file__, argv)
    prov.model("none", None, "the test suite: its zoo models are the shipped files in the clone")
    with tempfile.TemporaryDirectory(prefix="fresh_clone_") as tmp:
        repo = Path(tmp) / "mpdeploy"
        commit = clone(repo)
        argv_test = ([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_patterns.py"] if args.smoke
                     else ["make", "test"])
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
        try:
            t0 = time.perf_counter()
            run = provenance.run_child(argv_test, cwd=repo, timeout_s=3600)
        finally:
            if hog:
                hog.kill()
                hog.wait()
    text = run.stdout + run.stderr
    found = SUMMARY.findall(text)
    summary = found[-1] if found else (re.findall(r"^\d+ tests? collected.*$", text, re.M) or ["no summary"])[-1]
    record = {"commit": commit, "command": " ".join(argv_test), "summary": summary, "hog": args.hog,
              "note": args.note or ("a CPU-bound process beside it" if args.hog else "nothing of ours beside it"),
              **run.record(), "wall_s_total": round(time.perf_counter() - t0, 1), "outcomes": OUTCOME_LINES.findall(run.stdout),
              "tail": run.stdout.splitlines()[-15:], "stderr_tail": run.stderr.splitlines()[-5:]}
    old = json.loads(out.read_text()) if out.is_file() else {}
    runs = old.get("runs", []) + [{**record, "provenance": prov.finish()}]
    provenance.write_results(out, {"runs": runs}, prov)
    print(json.dumps({k: record[k] for k in ("commit", "summary", "returncode", "wall_s")}))
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
