"""Ray for a sweep: a local Ray by default (nothing to set up), an existing cluster with --ray-address.

Before any work, a probe task on every alive node reads a token the driver wrote into the artifact store
and writes one back: a node that cannot see the store (another filesystem mounted at the same path
included) is refused in one line. GPU kinds are Ray's own `accelerator_type:<KIND>` resources.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0


def kind_resource(kind: str) -> str:
    return f"accelerator_type:{kind}"


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """Attach to the Ray at `address`, to one this process already runs, or start a local one (stopped after)."""
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:  # "local": a new Ray of our own, never one `ray start` left on this machine (or its stale address)
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise MpdeployError(f"cannot start or reach {where} ({first}); check --ray-address "
                                "(e.g. ray://HOST:10001 or HOST:6379) and that `ray status` works there") from None
        started = True
    try:
        yield {"cpus": int(ray.cluster_resources().get("CPU", 0)), "started_here": started}
    finally:
        if started:
            ray.shutdown()


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _probe(store: str, token_name: str, token: str) -> dict[str, Any]:
    """Runs on one node: can it read the driver's token and write into the store?"""
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        seen = (Path(store) / token_name).read_text()
        (Path(store) / f"{token_name}.{node}").write_text(token)
    except OSError as exc:
        return {"node": node, "ok": False, "why": f"{type(exc).__name__}: {exc.strerror or exc}"}
    return {"node": node, "ok": seen == token, "why": None if seen == token else "it holds another folder there"}


def probe_store(store: Path) -> list[dict[str, Any]]:
    """Refuse (one line) unless every alive node sees `store` (the same folder, readable and writable)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    token, name = uuid.uuid4().hex, f".probe-{uuid.uuid4().hex[:12]}"
    (store / name).write_text(token)
    nodes = alive_nodes()
    try:
        refs = [ray.remote(_probe).options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(str(store), name, token) for n in nodes]
        try:
            answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise MpdeployError(f"the store probe did not answer within {PROBE_TIMEOUT_S:.0f} s on every node of the "
                                "Ray cluster; check `ray status`") from None
        for node, answer in zip(nodes, answers):
            written = (store / f"{name}.{answer['node']}")
            if answer["ok"] and not written.is_file():
                answer = {**answer, "ok": False, "why": "what it wrote there does not appear here"}
            if not answer["ok"]:
                raise MpdeployError(
                    f"Ray node {node.get('NodeManagerAddress')} ({answer['node'][:8]}) cannot see the artifact store "
                    f"{store} ({answer['why']}); put --out on a filesystem every node mounts at the same path")
    finally:
        for path in store.glob(f"{name}*"):
            path.unlink(missing_ok=True)
    logger.info("artifact store %s: seen by all %d Ray node(s)", store, len(nodes))
    return nodes


def check_kinds(kinds: Sequence[str]) -> dict[str, int]:
    """Every asked GPU kind must be a resource of some node: one line naming the kinds the cluster has."""
    import ray

    resources = ray.cluster_resources()
    have = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    missing = [k for k in kinds if kind_resource(k) not in resources]
    if missing:
        raise MpdeployError(f"no Ray node offers GPU kind {', '.join(missing)} (resource accelerator_type:<KIND>); "
                            f"this cluster has {', '.join(have) or 'none'}")
    return {k: int(sum(1 for n in alive_nodes() if kind_resource(k) in (n.get("Resources") or {}))) for k in kinds}


def trial_bundles(threads: int, kind: str | None) -> list[dict[str, float]]:
    """Resources of one trial: its CPU steps anywhere; with a kind, a second bundle on a node of that kind."""
    bundles: list[dict[str, float]] = [{"CPU": float(threads)}]
    if kind is not None:
        bundles.append({"CPU": float(threads), kind_resource(kind): 0.001})
    return bundles


def threads_per_trial(cpus: int, concurrent: int | None) -> tuple[int, int]:
    """(threads per trial, trials at once): the cores shared out so trials never oversubscribe them."""
    cpus = max(1, cpus)
    concurrent = max(1, min(concurrent or cpus, cpus))
    return max(1, cpus // concurrent), concurrent
