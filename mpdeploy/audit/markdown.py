"""audit.md: the report a person reads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpdeploy.audit.common import fmt_pct, host_text, runtime_text
from mpdeploy.core.kinds import AuditFolder

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# the Markdown report


def _ms(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _compact(info: Mapping[str, Any]) -> str:
    """key: value pairs for a table cell; long notes and nested records stay in audit.json."""
    parts = []
    for k, v in info.items():
        if v is None or isinstance(v, Mapping) or k in ("note", "fingerprint"):
            continue
        text = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        if len(text) <= 80:
            parts.append(f"{k}: {text}")
    return "; ".join(parts) or "n/a"


def _interval_text(interval: Mapping[str, Any] | None) -> str:
    if not interval or interval.get("high") is None or interval.get("center") is None:
        return "n/a"
    return f"{interval['low']:.3f}-{interval['high']:.3f} (+-{100 * interval['half_width']:.1f}%)"


def _timing_text(method: Mapping[str, Any]) -> str:
    text = (f"up to {method['warmup_calls']} warm-up calls per engine and batch, then interleaved rounds of "
            f"{method['calls_per_round']} calls per engine (dense first in even rounds, sparse first in odd)")
    if method.get("adaptive"):
        tol = method.get("ratio_tolerance")
        budget = method.get("time_budget_s")
        text += (f": {method['min_rounds']} to {method['max_rounds']} rounds, stopping once the ratio's 95% interval "
                 f"is within {'+-' + format(100 * tol, 'g') + '%' if tol else 'no tolerance'} or the batch's time "
                 f"budget is spent (audit budget {format(budget, 'g') + ' s' if budget else 'none'})")
    else:
        text += f": {method['rounds']} rounds"
    return text


def render_markdown(result: Mapping[str, Any], engine_root: Path) -> str:
    """audit.md from audit.json's record: headline and failures, then one section per measurement."""
    plots = set(result.get("plots") or [])
    lines = [*_headline(result, engine_root), *_setup_section(result), *_latency_section(result, plots),
             *_accuracy_section(result, plots), *_reference_section(result), *_sensitivity_section(result, plots),
             *_weights_section(result), *_caveats_section(result), *_thresholds_section(result)]
    return "\n".join(lines)


def _headline(result: Mapping[str, Any], engine_root: Path) -> list[str]:
    """The verdict, what was compared on what, the headline numbers and the failures."""
    s, acc, lat = result["summary"], result["accuracy"], result["latency"]
    dev = result["device"]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines = [f"# Audit of `{engine_root.name}`: **{verdict}**", ""]
    lines.append(
        f"Sparse engine ({s['pattern']}, budget {s['budget'] or 'not recorded'}, saliency "
        f"{s['saliency'] or 'not recorded'}) against its dense twin, "
        f"both on **{runtime_text(result['backend'], dev['runtime'], dev['host'])}**, "
        f"{result['data']['images']} {result['data']['kind']} images."
    )
    lines.append("")
    if acc is not None:
        if acc.get("top1_dense") is not None:
            err = f" ± {100 * acc['top1_drop_stderr']:.2f}" if acc.get("top1_drop_stderr") is not None else ""
            lines.append(f"- **Top-1**: dense {fmt_pct(acc['top1_dense'], 2)} -> sparse {fmt_pct(acc['top1_sparse'], 2)} "
                         f"(drop {100 * acc['top1_drop']:.2f}{err} pts; gate: at most "
                         f"{100 * result['thresholds']['max_top1_drop']:.2f} pts)")
        else:
            lines.append(f"- **Top-1**: not measured: {acc.get('labels_note')}; gate: top-1 disagreement with dense at "
                         f"most {100 * result['thresholds']['max_top1_drop']:.2f} pts")
        lines.append(f"- **Agreement with dense**: {fmt_pct(acc['agreement'], 2)} ({acc['disagreements']} of "
                     f"{acc['images']} images change their top-1); **certified**: {fmt_pct(acc['certified_fraction'], 1)}")
    lines += _fp32_gate_lines(result)
    if lat:
        speed = ", ".join(f"batch {b}: {v['ratio_p50']:.2f}x" for b, v in lat.items())
        lines.append(f"- **Speedup** (dense p50 / sparse p50): {speed} (gate: {_speed_gate_words(result['thresholds'])})")
    if s.get("mac_reduction") is not None:
        lines.append(f"- **MAC reduction**: {fmt_pct(s['mac_reduction'])} (runs sparse on 2:4 hardware: "
                     f"{fmt_pct(s['sparse_execution_mac_reduction'])})")
    lines.append("")
    if result["failures"]:
        lines += ["**Failures:**", ""] + [f"- {f}" for f in result["failures"]] + [""]
    return lines


def _fp32_gate_lines(result: Mapping[str, Any]) -> list[str]:
    """The INT8 / FP16 engine against the fp32 dense model (audit/fp32_reference.py), when it was measured."""
    gate = (result.get("thresholds") or {}).get("fp32_gate")
    if not gate or gate.get("value") is None:
        return []
    limit = f"gate: at most {100 * gate['max']:.2f} pts"
    if gate["metric"] == "top1_drop_vs_fp32":
        return [f"- **Against the fp32 model** ({gate['precision']} sparse engine vs {gate['reference']}): top-1 "
                f"{fmt_pct(gate['top1_fp32'], 2)} -> {fmt_pct(gate['top1_engine'], 2)} (drop "
                f"{100 * gate['value']:.2f} pts on {gate['images']} images; {limit})"]
    return [f"- **Against the fp32 model** ({gate['precision']} sparse engine vs {gate['reference']}): top-1 "
            f"disagreement {100 * gate['value']:.2f} pts on {gate['images']} images ({limit})"]


def _setup_section(result: Mapping[str, Any]) -> list[str]:
    """Engine files, backend, runtime, host, load, data, timing method, when."""
    dev, host = result["device"], result["device"]["host"]
    lines = ["## What was measured, where", "", "| | |", "|---|---|"]
    rows = [
        ("engine folder", f"`{result['engine']['folder']}/` ({result['engine']['files']['sparse']}, "
                          f"{result['engine']['files']['dense']}), precision {result['engine']['precision']}"),
        ("backend", result["backend"]),
        ("runtime", _compact(dev["runtime"])),
        ("built for", _compact(dev["engine_manifest"] or {})),
        ("host", host_text(host)),
        ("load average", f"before timing {dev['loadavg_before_timing']}, after {dev['loadavg_after_timing']}"),
        ("data", f"{result['data']['description']}; labels: {result['data']['labels_note']}"),
        ("timing", _timing_text(result["latency_method"])),
        ("when", f"{result['started']} ({result['seconds']} s)"),
    ]
    return lines + [f"| {k} | {v} |" for k, v in rows] + [""]


def _latency_section(result: Mapping[str, Any], plots: set[str]) -> list[str]:
    lat = result["latency"]
    if not lat:
        return []
    lines = ["## Latency", "",
             "| batch | dense p50 / p90 / p99 ms | sparse p50 / p90 / p99 ms | dense img/s | sparse img/s | "
             "speedup p50 | per-round p10-p90 | 95% interval | rounds x calls (stopped on) |",
             "|---:|---|---|---:|---:|---:|---|---|---|"]
    for b, v in lat.items():
        d, sp, r = v["dense"], v["sparse"], v["ratio_spread"]
        lines.append(f"| {b} | {_ms(d['p50'])} / {_ms(d['p90'])} / {_ms(d['p99'])} | {_ms(sp['p50'])} / "
                     f"{_ms(sp['p90'])} / {_ms(sp['p99'])} | {d['throughput_img_s']:.0f} | "
                     f"{sp['throughput_img_s']:.0f} | **{v['ratio_p50']:.3f}x** | {r['p10']:.3f}-{r['p90']:.3f} | "
                     f"{_interval_text(v.get('ratio_interval'))} | {r['rounds']} x {v.get('calls_per_round', '?')} calls "
                     f"({v.get('stopped', 'fixed')}) |")
    lines += ["", "Each p-value is over the rounds' calls of that batch size (rounds x calls per round); "
              "throughput is batch / mean call time; speedup > 1 means the sparse engine is faster. The interval "
              "is a t-interval on the log of the per-round ratios; rounds stop on the tolerance, the time "
              "budget, or the maximum.", ""]
    if AuditFolder.PLOTS["latency"] in plots:
        lines += [f"![latency: dense vs sparse per batch size]({AuditFolder.PLOTS['latency']})", ""]
    return lines


def _accuracy_section(result: Mapping[str, Any], plots: set[str]) -> list[str]:
    """Top-1 / top-5 / agreement / certified / logit error, and what the certified fraction means."""
    acc = result["accuracy"]
    if acc is None:
        return []
    lines = ["## Accuracy", "", "| metric | dense | sparse | difference |", "|---|---:|---:|---:|"]
    for k in (1, 5):
        if acc.get(f"top{k}_dense") is not None:
            lines.append(f"| top-{k} | {fmt_pct(acc[f'top{k}_dense'], 2)} | {fmt_pct(acc[f'top{k}_sparse'], 2)} | "
                         f"{-100 * acc[f'top{k}_drop']:+.2f} pts |")
    lines.append(f"| top-1 agreement with dense | | {fmt_pct(acc['agreement'], 2)} | {acc['disagreements']} images differ |")
    lines.append(f"| certified (m > 2d) | | {fmt_pct(acc['certified_fraction'], 2)} | {acc['certified']} of {acc['images']} |")
    lines.append(f"| logit error max / mean abs | | {acc['max_logit_error']:.4g} / {acc['mean_logit_error']:.4g} | "
                 f"dense mean abs logit {acc['dense_logit_scale']:.3g} |")
    lines.append("")
    if AuditFolder.PLOTS["accuracy"] in plots:
        lines += [f"![accuracy and agreement]({AuditFolder.PLOTS['accuracy']})", ""]
    lines += ["### Certified fraction", "",
              "For each image, m is the dense engine's top-1 margin (largest minus second-largest logit) and "
              "d = max |z_sparse - z_dense| over the logits. A perturbation of size d can shrink the margin by at "
              "most 2d, so an image with m > 2d provably keeps its dense prediction. The certified fraction is a "
              "lower bound on agreement that does not depend on labels. Median margin "
              f"{acc['margin_quantiles']['p50']:.3g}, median d {acc['perturbation_quantiles']['p50']:.3g}.", ""]
    if AuditFolder.PLOTS["certified"] in plots:
        lines += [f"![certified fraction: margins vs perturbations]({AuditFolder.PLOTS['certified']})", ""]
    return lines


def _reference_section(result: Mapping[str, Any]) -> list[str]:
    ref = result.get("engine_vs_pytorch")
    if not ref:
        return []
    return ["### Engines vs the pruned PyTorch model", "",
            f"On {ref['images']} images: sparse engine max |diff| {ref['sparse']['max_abs_diff']:.3g} "
            f"(relative {ref['sparse']['relative']:.2g}), dense engine {ref['dense']['max_abs_diff']:.3g} "
            f"(relative {ref['dense']['relative']:.2g}). Small values mean the engines compute the pruned "
            "artifact's functions; reduced precision (fp16/int8) legitimately raises them.", ""]


def _sensitivity_section(result: Mapping[str, Any], plots: set[str]) -> list[str]:
    """How the per-layer map was measured, then the 12 most sensitive layers."""
    sens = result.get("sensitivity_summary")
    if not (sens and result["sensitivity"]):
        return []
    rho = sens["spearman_signal_vs_effect"]
    lines = ["## Per-layer sensitivity", "",
             f"The dense model in PyTorch with only one layer's mask applied, on {sens['images']} images"
             + (f" ({sens['layers_measured']} of {sens['layers_pruned']} pruned layers, spread over the depth; "
                f"stopped on: {sens['stopped']})" if sens.get("layers_pruned", 0) > sens.get("layers_measured", 0)
                else "") + ". "
             "Effect = mean over images of max |z - z_dense| (the certificate's d, for that layer alone); "
             "relative L2 = mean ||z - z_dense|| / ||z_dense||; flips = share of images whose top-1 changes. "
             "The MP signal is the layer's bulk fraction from the pruned manifest (higher = more noise-like, "
             "expected to be safer to prune; a negative Spearman correlation means the signal ranks layers "
             "the way the logits do). "
             f"Spearman(signal, effect) = {'n/a' if rho is None else format(rho, '+.2f')}; "
             f"all masks together: effect {sens['all_layers']['logit_effect']:.3g}, flips "
             f"{fmt_pct(sens['all_layers']['flips'])} (sum of single effects {sens['sum_of_single_effects']:.3g}).",
             "", "| layer | pattern | MP signal | z | effect | relative L2 | flips |", "|---|---|---:|---:|---:|---:|---:|"]
    ranked = sorted(result["sensitivity"], key=lambda r: -r["logit_effect"])
    budget = result["summary"].get("budget")
    for r in ranked[:12]:
        sig = "n/a" if r["signal"] is None else f"{r['signal']:.3f}"
        # The uniform budget standardizes nothing: its z of 0 would read as "average".
        z = "n/a" if r["z"] is None or budget != "mp" else f"{r['z']:+.2f}"
        lines.append(f"| `{r['layer']}` | {r['pattern']} | {sig} | {z} | {r['logit_effect']:.3g} | "
                     f"{r['relative_l2']:.3g} | {fmt_pct(r['flips'])} |")
    if len(ranked) > 12:
        lines.append(f"| ... {len(ranked) - 12} more in {AuditFolder.RESULT} | | | | | | |")
    lines.append("")
    if AuditFolder.PLOTS["sensitivity"] in plots:
        lines += [f"![per-layer sensitivity vs MP signal]({AuditFolder.PLOTS['sensitivity']})", ""]
    return lines


def _weights_section(result: Mapping[str, Any]) -> list[str]:
    w = result.get("weights")
    lines = ["## Sparse weights in the engine", ""]
    if w:
        lines.append(f"Checked {w['checked']} pruned layers in `{Path(w['source']).name}` ({w['note']}): "
                     f"{w['ok']} are N:M along their reduction axis"
                     f"{', every 2:4 layer also 2:4' if not w['violations'] else ''}. By TensorRT's placement "
                     f"rules, {w['trt_rules']['eligible_and_2_4']} of {w['trt_rules']['weights_seen']} Conv/MatMul/Gemm "
                     "weights are eligible for sparse math and 2:4.")
        for v in w["violations"][:10]:
            lines.append(f"- `{v['layer']}` ({v['pattern']}): {v['problem']}")
    else:
        lines.append("Not checked (see caveats).")
    lines.append("")
    return lines


def _caveats_section(result: Mapping[str, Any]) -> list[str]:
    if not result["warnings"]:
        return []
    return ["## Caveats", ""] + [f"- {x}" for x in result["warnings"]] + [""]


def _speed_gate_words(t: Mapping[str, Any]) -> str:
    """The speed gate as it was applied: --min-speedup when set, else the default 'never slower' rule."""
    gate = t.get("speed_gate") or {}
    if t["min_speedup"] is not None:
        return f"at least {t['min_speedup']:g}x dense p50 / sparse p50 at the largest batch"
    if gate.get("sparse_kernels") is False:
        return "none: this backend has no sparse kernels, so no speed claim is made"
    if not gate:
        return "none: no batch size was timed"
    action = "fails" if gate.get("fail_if_slower", True) else "warns"
    return (f"the audit {action} when the ratio's 95% interval at batch {gate['batch']} lies entirely below 1.0 "
            "(measurably slower) and warns when it holds 1.0")


def _thresholds_section(result: Mapping[str, Any]) -> list[str]:
    t = result["thresholds"]
    speed = _speed_gate_words(t)
    return ["## Thresholds", "",
            f"- accuracy gate: {t['accuracy_gate']['metric']} at most {100 * t['max_top1_drop']:.2f} pts "
            "(top-1 drop when the labels fit the model, else top-1 disagreement with dense)",
            f"- speed gate: {speed}",
            "- always: every pruned layer N:M in the engine weights; outputs of the right shape, finite",
            "", f"Machine-readable: `{AuditFolder.RESULT}` (schema {AuditFolder.SCHEMA}).", ""]
