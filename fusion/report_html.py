"""A self-contained HTML report from ``metrics.json``: inline SVG plots, no plotting library.

ROC curves per finding (all modalities and each subset), reliability diagrams, bars per site,
per subgroup and per modality subset, and the tables behind them.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

W, H, PAD = 260, 220, 34
COLOURS = ["#1f5fa8", "#d1495b", "#2a9d8f", "#e9a23b", "#6c5b7b", "#8d99ae", "#3d405b"]


def _x(v: float) -> float:
    return PAD + v * (W - PAD - 8)


def _y(v: float) -> float:
    return H - PAD - v * (H - PAD - 8)


def _axes(xlabel: str, ylabel: str) -> str:
    ticks = "".join(
        f'<text x="{_x(t):.0f}" y="{H - PAD + 14}" font-size="9" text-anchor="middle">{t:g}</text>'
        f'<text x="{PAD - 4}" y="{_y(t) + 3:.0f}" font-size="9" text-anchor="end">{t:g}</text>'
        for t in (0, 0.5, 1)
    )
    return (
        f'<rect x="{PAD}" y="8" width="{W - PAD - 8}" height="{H - PAD - 8}" fill="none" '
        f'stroke="#999"/>{ticks}'
        f'<text x="{(W + PAD) / 2:.0f}" y="{H - 4}" font-size="10" text-anchor="middle">'
        f"{xlabel}</text>"
        f'<text x="10" y="{H / 2:.0f}" font-size="10" transform="rotate(-90 10 {H / 2:.0f})" '
        f'text-anchor="middle">{ylabel}</text>'
    )


def _svg(body: str, title: str, height: int = H) -> str:
    return (
        f'<figure><svg width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img"><title>{html.escape(title)}</title>'
        f"{body}</svg><figcaption>{html.escape(title)}</figcaption></figure>"
    )


def roc_svg(finding: str, curves: dict[str, list[list[float]]], aurocs: dict[str, Any]) -> str:
    body = _axes("1 - specificity", "sensitivity")
    body += f'<line x1="{_x(0)}" y1="{_y(0)}" x2="{_x(1)}" y2="{_y(1)}" stroke="#ccc" ' + (
        'stroke-dasharray="3 3"/>'
    )
    for i, (name, pts) in enumerate(curves.items()):
        if not pts:
            continue
        colour = COLOURS[i % len(COLOURS)]
        width = 2.2 if i == 0 else 1
        path = " ".join(f"{_x(f):.1f},{_y(t):.1f}" for f, t in pts)
        body += f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="{width}"/>'
        label = f"{name} {aurocs.get(name) or 0:.2f}"
        body += (
            f'<text x="{_x(0.98):.0f}" y="{_y(0.05 + 0.07 * i):.0f}" font-size="8" '
            f'text-anchor="end" fill="{colour}">{html.escape(label)}</text>'
        )
    return _svg(body, f"ROC: {finding}")


def reliability_svg(finding: str, bins: list[dict[str, float]], ece: Any) -> str:
    body = _axes("predicted probability", "observed frequency")
    body += f'<line x1="{_x(0)}" y1="{_y(0)}" x2="{_x(1)}" y2="{_y(1)}" stroke="#ccc"/>'
    n_max = max((b["n"] for b in bins), default=1)
    for b in bins:
        r = 2 + 5 * (b["n"] / n_max) ** 0.5
        body += (
            f'<circle cx="{_x(b["mean_predicted"]):.1f}" cy="{_y(b["observed"]):.1f}" r="{r:.1f}" '
            f'fill="{COLOURS[0]}" fill-opacity="0.7"><title>n={b["n"]}</title></circle>'
        )
    pts = " ".join(f"{_x(b['mean_predicted']):.1f},{_y(b['observed']):.1f}" for b in bins)
    body += f'<polyline points="{pts}" fill="none" stroke="{COLOURS[0]}"/>'
    return _svg(body, f"Reliability: {finding} (ECE {ece if ece is not None else 'n/a'})")


def bars_svg(title: str, values: dict[str, Any], lo: float = 0.5) -> str:
    """Horizontal bars of AUROC (axis from ``lo`` to 1), with the CI as a whisker if given."""
    row, height = 18, 26 + 18 * len(values)
    left, right = 110, W - 10
    scale = (right - left) / (1 - lo)
    body = ""
    for i, (name, v) in enumerate(values.items()):
        y = 12 + i * row
        auc = v.get("auroc") if isinstance(v, dict) else v
        body += f'<text x="{left - 4}" y="{y + 11}" font-size="9" text-anchor="end">'
        body += f"{html.escape(name)}</text>"
        if auc is None:
            continue
        body += (
            f'<rect x="{left}" y="{y + 2}" width="{max(0.0, (auc - lo) * scale):.1f}" '
            f'height="{row - 6}" fill="{COLOURS[i % len(COLOURS)]}" fill-opacity="0.8"/>'
            f'<text x="{right}" y="{y + 11}" font-size="8" text-anchor="end">{auc:.3f}</text>'
        )
        ci = v.get("auroc_ci") if isinstance(v, dict) else None
        if ci:
            a, b = (left + max(0.0, c - lo) * scale for c in ci)
            body += f'<line x1="{a:.1f}" x2="{b:.1f}" y1="{y + 8}" y2="{y + 8}" stroke="#222"/>'
    body += f'<text x="{left}" y="{height - 2}" font-size="8">AUROC axis {lo}..1</text>'
    return _svg(body, title, height)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}"
    if isinstance(c, list) and len(c) == 2 and all(isinstance(x, float) for x in c):
        return f"[{c[0]:.3f}, {c[1]:.3f}]"
    return "n/a" if c is None else str(c)


def render(metrics: dict[str, Any]) -> str:
    findings = metrics["findings"]
    subsets = metrics["subsets"]
    all_name = next(iter(subsets))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mmcds evaluation</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1200px}"
        "figure{display:inline-block;margin:4px}figcaption{font-size:11px;text-align:center}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
        "padding:2px 6px;font-size:12px}</style></head><body>",
        f"<h1>mmcds evaluation: {html.escape(metrics['model']['version'])}</h1>",
        f"<p>Data: {html.escape(str(metrics['data']))}</p>",
        "<h2>All modalities</h2>",
    ]
    rows = []
    for f in findings:
        m = subsets[all_name][f]
        ops = m["operating_points"]
        rows.append(
            [
                f,
                m["n"],
                m["positives"],
                m["auroc"],
                m.get("auroc_ci"),
                m["auprc"],
                m["ece"],
                (m.get("ece_if_calibrated") or {}).get("p95"),
                m["brier"],
                ops["warning"]["sensitivity"],
                ops["warning"]["specificity"],
                ops["critical"]["sensitivity"],
                ops["critical"]["specificity"],
            ]
        )
    parts.append(
        _table(
            rows,
            [
                "finding",
                "n",
                "pos",
                "AUROC",
                "95% CI",
                "AUPRC",
                "ECE",
                "ECE of a calibrated model, p95",
                "Brier",
                "warn sens",
                "warn spec",
                "crit sens",
                "crit spec",
            ],
        )
    )
    parts.append("<h2>ROC curves (all modalities and subsets)</h2>")
    for f in findings:
        curves = metrics["plots"]["roc"][f]
        parts.append(roc_svg(f, curves, {k: subsets[k][f]["auroc"] for k in curves}))
    parts.append("<h2>Reliability (all modalities, calibrated)</h2>")
    for f in findings:
        parts.append(
            reliability_svg(f, metrics["plots"]["reliability"][f], subsets[all_name][f]["ece"])
        )
    parts.append("<h2>Modality subsets</h2>")
    for f in findings:
        parts.append(bars_svg(f"{f}: by modality subset", {k: v[f] for k, v in subsets.items()}))
    fvs = metrics.get("fusion_vs_best_single", {})
    parts.append("<h2>Fusion against the best single modality (paired bootstrap)</h2>")
    parts.append(
        _table(
            [
                [f, v["best_single"], v["difference"], v["difference_ci"], v["p_value"]]
                for f, v in fvs.items()
            ],
            ["finding", "best single", "AUROC gain", "95% CI", "p"],
        )
    )
    parts.extend(_baseline(metrics.get("baseline")))
    parts.append("<h2>Sites</h2>")
    for f in findings:
        parts.append(bars_svg(f"{f}: by site", {s: v[f] for s, v in metrics["sites"].items()}))
    shift = metrics.get("site_shift", {})
    if shift:
        parts.append(
            _table(
                [
                    [
                        f,
                        v["auroc"],
                        v["prevalence"],
                        v["global"],
                        v["global_gap"],
                        v["per_site"],
                        v["per_site_gap"],
                    ]
                    for f, v in shift.items()
                ],
                [
                    "finding",
                    "AUROC",
                    "prevalence",
                    "ECE global cal.",
                    "gap",
                    "ECE per-site cal.",
                    "gap",
                ],
            )
        )
    parts.append("<h2>Subgroups</h2>")
    for name, groups in metrics["subgroups"].items():
        for f in findings:
            parts.append(bars_svg(f"{f}: by {name}", {g: v[f] for g, v in groups.items()}))
    parts.append("</body></html>")
    return "\n".join(parts)


def _baseline(report: dict[str, Any] | None) -> list[str]:
    """The ``--baseline`` table: baseline and model AUROC, paired difference, per finding."""
    if not report:
        return []
    rows = []
    for f, v in report["findings"].items():
        for name in report["model_scores"]:
            rows.append(
                [f, name, v.get(f"{name}_auroc"), v.get(f"{name}_auroc_ci"),
                 v.get("baseline_auroc"), v.get("baseline_auroc_ci"),
                 v.get(f"{name}_minus_baseline"), v.get(f"{name}_minus_baseline_ci"),
                 v.get(f"{name}_verdict")]
            )  # fmt: skip
    head = ["finding", "model scores", "AUROC", "95% CI", f"{report['name']} AUROC", "95% CI",
            "difference", "95% CI (paired)", "verdict"]  # fmt: skip
    title = f"Baseline: {report['method']}; fitted on {report['fitted_on']}"
    return [f"<h2>{html.escape(title)}</h2>", _table(rows, head)]


def write_report(metrics: dict[str, Any], path: Path) -> Path:
    path.write_text(render(metrics), encoding="utf-8")
    return path
