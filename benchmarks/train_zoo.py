"""Train the zoo's digits models once and write the weights mpdeploy ships (mpdeploy/models/zoo_weights/).

The zoo models used to be trained on first use, so two machines measured two different models. They are
now trained once, here, and shipped: this script is how the shipped files were made, and how to remake
them. It trains with one thread and deterministic kernels (seed 0), saves `<name>.safetensors`, and prints
the file's sha256 and test top-1, the two values to record in `mpdeploy/models/zoo.py`'s registry.

    .venv/bin/python benchmarks/train_zoo.py                 # both models, into mpdeploy/models/zoo_weights/
    .venv/bin/python benchmarks/train_zoo.py digits_vit --out /tmp/zoo

A retrained file is the same bytes only on the same CPU kind and library versions: floating-point
sums differ between instruction sets. That is why the files are shipped rather than retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpdeploy.models.zoo import zoo_entry, create_zoo_model, digits_top1, list_zoo_models, train_digits  # noqa: E402


def min_test_margin(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """Smallest gap between the top two logits over the test split: how far any prediction is from a tie.

    The test asserting the exact top-1 relies on no test image sitting on a tie that another thread
    count's rounding could flip."""
    from mpdeploy.models.data import digits_tensors

    x, _ = digits_tensors(tuple(input_shape), "test")
    with torch.no_grad():
        top2 = model(x).topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def train_one(name: str, out: Path) -> dict:
    from safetensors.torch import save_file

    entry = zoo_entry(name)
    torch.manual_seed(0)
    model = create_zoo_model(name, trained=False)
    start = time.perf_counter()
    metrics = train_digits(model, entry, seed=0,
                           progress=lambda e, n, loss: print(f"  {name} epoch {e}/{n} loss {loss:.4f}", flush=True))
    seconds = time.perf_counter() - start
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"name": name, "file": str(path), "sha256": sha, "test_top1": metrics["test_top1"],
            "min_test_margin": min_test_margin(model, entry.input_shape),
            "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list_zoo_models())
    parser.add_argument("--out", type=Path, default=REPO / "mpdeploy" / "zoo_weights")
    args = parser.parse_args()
    # One thread and deterministic kernels: the same bytes on a rerun on this machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.names:
        print(json.dumps(train_one(name, args.out)), flush=True)


if __name__ == "__main__":
    main()
