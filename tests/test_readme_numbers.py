"""Every figure in the README comes from a results file (fast: reads files, runs no benchmark).

1. The rendered blocks (`<!-- results:NAME -->` ... `<!-- /results:NAME -->`) equal what
   benchmarks/render_readme.py makes from benchmarks/results/ now.
2. Outside those blocks (and outside code), a number that looks measured (a decimal, a percentage, a
   duration, a size, a speed ratio, a pass count, a fraction) is either one of the paper's numbers in
   docs/method.md or in ALLOWED below: constants that are not measurements (versions, defaults,
   limits, goals), each with the reason it is there.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import render_readme  # noqa: E402

README = REPO / "README.md"

# Numbers in the README's prose that are not measurements. Keep it short: a measured figure belongs in
# a results file and a rendered block, not here.
ALLOWED = {
    "3.11": "the Python version tested",
    "2.8 GB": "torch's download size (a package fact, not a measurement of ours)",
    "0.53.6": "the Polygraphy version whose BF16 misreading docs/export.md describes",
    "2.51": "the bundled tritonserver version",
    "1%": "goals and gates: the MP edge goal (docs/method.md), the INT8 promise, ModelOpt margin goal",
    "5%": "the MP false-spike goal (docs/method.md) and the audit's certified-fraction wording",
    "0.8%": "the TW-margin bound for which the 1% edge goal can hold (a property of the formula)",
    "90%": "the default MAC-reduction target fraction (DEFAULT_MP_TARGET_FRACTION)",
    "35%": "the audit time budget split (accuracy 35%, timing 45%, sensitivity 20%)",
    "45%": "the audit time budget split",
    "20%": "the audit time budget split",
    "2%": "the audit's ratio tolerance default (+-2%)",
    "5 s": "the progress log interval",
    "120 s": "the audit's default time budget",
    "60 s": "the prune/restore time goals from the issues",
    "1.28%": "the TW margin at 64x576: computed from the formula (mpdeploy/sparsity/spectral.py), not measured",
    "1.0x": "what ORT's CPU provider gives without 2:4 kernels (~1.0x: no sparse speedup)",
    "95%": "the confidence level of the audit's speedup interval",
    "0.02": "the audit's default --max-top1-drop",
    "1e-4": "tolerances the tests assert (outputs vs PyTorch)",
    "0.0": "the Triton test's known answer: replies equal ONNX Runtime's exactly",
    "8.0": "the CUDA compute capability the torch backend needs",
    "0.53": "the Polygraphy API version the TensorRT code is written against",
    "127.0.0.1": "the address the test server listens on",
    "1.0": "the speed gate's boundary: a ratio interval holding 1.0 is no measurable difference",
    "90 s": "the prune-time goal of the sweep issue (ResNet50 / ViT-B/16 on 2 cores)",
}
# A measured-looking token: versions and dotted numbers, decimals with units, percentages, durations,
# sizes, ratios, pass counts, fractions.
NUMBER = re.compile(
    r"(?<![\w.:/-])("
    r"\d+m\d+s"                                  # 4m27s
    r"|\d+(?:\.\d+)+ ?(?:GiB|MiB|GB|MB|ms|s|min|x)\b"  # 19.6 s, 1.0 GiB, 1.31x
    r"|\d+ ?(?:GiB|MiB|GB|ms|s|min)\b(?! \d)"     # 120 s, 2 GiB
    r"|\d+(?:\.\d+)?%"                           # 44.7%, 90%
    r"|\d+(?:\.\d+)?e-\d+"                       # 7.2e-7
    r"|\d+(?:\.\d+){2,}"                         # 0.53.6
    r"|\d+\.\d+"                                 # 94.62
    r"|\d+/\d+(?= confirmed| eligible)"          # 48/48 confirmed
    r"|\d+ (?:passed|skipped|failed)"            # 490 passed
    r")")
BLOCK = render_readme.BLOCK
CODE_FENCE = re.compile(r"```.*?```", re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
COMMENT = re.compile(r"<!--.*?-->", re.S)


def prose(text: str) -> str:
    """The README without rendered blocks, code, link targets and comments: what a person wrote."""
    for pattern in (BLOCK, CODE_FENCE, CODE_SPAN, LINK_TARGET, COMMENT):
        text = pattern.sub(" ", text)
    return text


def method_numbers() -> set[str]:
    """The paper's numbers (docs/method.md): the README may quote them as the reference."""
    return {m.group(1) for m in NUMBER.finditer((REPO / "docs" / "method.md").read_text())}


def unbacked_numbers(text: str) -> list[str]:
    allowed = set(ALLOWED) | method_numbers()
    found = []
    for line_no, line in enumerate(prose(text).splitlines(), 1):
        for m in NUMBER.finditer(line):
            if m.group(1) not in allowed:
                found.append(f"{m.group(1)!r} in: {line.strip()[:120]}")
    return found


def test_rendered_blocks_match_the_results_files():
    text = README.read_text()
    names = render_readme.block_names(text)
    assert names, "the README has no rendered results blocks"
    assert len(names) == len(set(names)), "a results block appears twice"
    fresh = render_readme.render(text)
    if fresh != text:
        stale = [n for n, a, b in zip(names, BLOCK.finditer(text), BLOCK.finditer(fresh)) if a["body"] != b["body"]]
        pytest.fail(f"README blocks differ from benchmarks/results/: {stale}; run python benchmarks/render_readme.py")


def test_every_block_has_a_renderer_and_every_renderer_a_block():
    assert set(render_readme.block_names(README.read_text())) == set(render_readme.BLOCKS)


def test_no_number_in_the_prose_without_a_results_file():
    found = unbacked_numbers(README.read_text())
    assert not found, ("figures in README.md outside rendered blocks with no results file behind them "
                       "(render them from benchmarks/results/, or add a non-measured constant to ALLOWED "
                       "with its reason):\n" + "\n".join(found))


def test_the_checks_can_fail():
    """A planted number in prose and an edited rendered figure are both caught."""
    text = README.read_text()
    assert unbacked_numbers(text + "\nThe demo ran in 12.3 s and reached 97.40% top-1.\n") == [
        "'12.3 s' in: The demo ran in 12.3 s and reached 97.40% top-1.",
        "'97.40%' in: The demo ran in 12.3 s and reached 97.40% top-1."]
    match = next(BLOCK.finditer(text))
    edited = text[:match.start("body")] + "made-up figure 1.23\n" + text[match.end("body"):]
    assert render_readme.render(edited) != edited


def test_results_with_provenance_measured_the_shipped_zoo_weights():
    """A results file that records a zoo model measured today's shipped weights (re-measure after re-shipping)."""
    shipped = render_readme.shipped_zoo_sha256()
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        models = (json.loads(path.read_text()).get("provenance") or {}).get("models", {})
        for name, record in models.items():
            if name.startswith("zoo:"):
                assert record.get("sha256") == shipped[name], f"{path.name}: {name} is not the shipped file"


def test_a_missing_results_file_renders_as_not_measured(tmp_path):
    results = render_readme.Results(tmp_path)
    for name, fn in render_readme.BLOCKS.items():
        assert fn(results).startswith("Not measured yet"), name
