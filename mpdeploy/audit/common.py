"""Shared constants, host description and text helpers of the audit."""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpdeploy.core.machine import cpu_model
from mpdeploy.core.names import traits

logger = logging.getLogger(__name__)

SCHEMA = "mpdeploy.audit/1"
KIND = "audit"
AUDIT_DIR = "audit"
# A dense top-1 this many binomial standard errors above chance counts as "the labels fit the model".
CHANCE_SIGMAS = 3.0
# Engine vs PyTorch logits: beyond this relative error (fp32 engines) the engine is not computing the
# pruned model; a warning, not a gate, since reduced precision legitimately moves logits.
FP32_REL_TOLERANCE = 1e-3

Progress = Callable[[str, int, int], None]


@dataclass
class Findings:
    """What the audit's steps found, in the order they found it: failures decide the verdict, warnings
    are the report's caveats. One shared record keeps that order the same as the steps'."""

    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

# ---------------------------------------------------------------------------------------------------
# device and host


def host_info(placement: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The machine the audit ran on; `placement` is the caller's word on where it put the audit (a Ray node,
    for the sweep), recorded as given: None when the audit was run directly."""
    cpu = cpu_model()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "hostname": socket.gethostname(),
            "platform": platform.platform(), "python": platform.python_version(), "loadavg": loadavg(),
            "placement": None if placement is None else dict(placement)}


def host_text(host: Mapping[str, Any]) -> str:
    """The host line of audit.md; .get for the fields an audit may lack (hostname and placement are newer)."""
    text = f"{host.get('cpu')}, {host.get('cpu_count')} cores, {host.get('platform')}"
    if host.get("hostname"):
        text += f", host name `{host['hostname']}`"
    if host.get("placement"):
        text += "; placed by its caller on " + ", ".join(f"{k} `{v}`" for k, v in host["placement"].items())
    return text


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def runtime_text(backend: str, runtime: Mapping[str, Any], host: Mapping[str, Any]) -> str:
    parts = [backend]
    for key in ("gpu", "providers_preferred", "provider", "providers", "device", "name"):
        if runtime.get(key):
            value = runtime[key]
            parts.append(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
            break
    parts.append(str(host.get("cpu")))
    return " / ".join(parts)


def cpu_only(backend: str | None, runtime: Mapping[str, Any] | None) -> bool:
    return traits(backend).on_cpu(runtime)


def fmt_pct(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def pattern_text(layers: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for layer in layers:
        if layer.get("pattern"):
            counts[layer["pattern"]] = counts.get(layer["pattern"], 0) + 1
    if not counts:
        return "none"
    return " + ".join(f"{p} ({n})" if len(counts) > 1 else p for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
