"""The central report as one self-contained HTML page: tables and inline SVG plots, drawn here in Python.

Nothing is fetched (no script, no stylesheet or font from elsewhere, no image file): the page works offline and
can be mailed. Each plot is an ``<svg role="img">`` named by its ``<title>`` and described by its ``<desc>``; the
numbers behind it are in the tables below it. Plots:

- score distributions: per bundle version and label, each site's share of scores per bin (all weeks of the report)
  against the bundle's reference;
- drift over time: per bundle version and label, each site's weekly PSI against the reference (against the rest of
  the fleet where the bundle has no reference), with the alert level;
- ROC: per bundle version and label, each site's (1 - specificity, sensitivity) at the calibration thresholds.
"""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Any

# Line colours (Okabe-Ito, distinguishable with colour-blindness); each site also gets its own dash pattern.
_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#555555"]
_DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2", "10 4"]
_W, _H, _PAD = 520, 300, 48


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _site(value: Any) -> str:
    return "(no site)" if value is None else str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def roc_points(calibration_rows: list[dict[str, Any]]) -> dict[tuple[Any, str, str, str], list[tuple[float, float]]]:
    """(site, bundle_id, bundle_version, label) -> ROC points [(1 - specificity, sensitivity)] from the calibration
    table, thresholds high to low, framed by (0, 0) and (1, 1); thresholds where either is undefined (no truth of one
    class) are left out."""
    out: dict[tuple[Any, str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in sorted(calibration_rows, key=lambda r: -r["threshold"]):
        if row["sensitivity"] is None or row["specificity"] is None:
            continue
        key = (row["site"], row["bundle_id"], row["bundle_version"], row["label"])
        out[key].append((1.0 - row["specificity"], row["sensitivity"]))
    return {k: [(0.0, 0.0), *v, (1.0, 1.0)] for k, v in out.items()}


class _Plot:
    """One line chart in SVG: x and y ranges in data units, lines added as (name, [(x, y)])."""

    def __init__(self, ident: str, title: str, desc: str, x: tuple[float, float], y: tuple[float, float],
                 x_label: str, y_label: str):  # fmt: skip
        self.ident, self.title, self.desc = ident, title, desc
        self.x, self.y, self.x_label, self.y_label = x, y, x_label, y_label
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []

    def _px(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x, self.y
        px = _PAD + (x - x0) / ((x1 - x0) or 1) * (_W - 2 * _PAD)
        py = _H - _PAD - (y - y0) / ((y1 - y0) or 1) * (_H - 2 * _PAD)
        return round(px, 1), round(py, 1)

    def line(
        self, name: str, points: list[tuple[float, float]], n: int, *, dash: str | None = None, colour: str = ""
    ) -> None:
        colour = colour or _COLOURS[n % len(_COLOURS)]
        pattern = _DASHES[n % len(_DASHES)] if dash is None else dash
        pts = " ".join(f"{px},{py}" for px, py in (self._px(x, y) for x, y in points))
        dash_attr = f' stroke-dasharray="{pattern}"' if pattern else ""
        self.parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash_attr} points="{pts}"/>')
        self.legend.append((name, colour, pattern))

    def hline(self, y: float, name: str) -> None:
        (x0, x1) = self.x
        (ax, ay), (bx, by) = self._px(x0, y), self._px(x1, y)
        self.parts.append(f'<line x1="{ax}" y1="{ay}" x2="{bx}" y2="{by}" stroke="#B00020" stroke-dasharray="4 4"/>')
        self.legend.append((name, "#B00020", "4 4"))

    def svg(self, x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]]) -> str:
        t, d = f"{self.ident}-t", f"{self.ident}-d"
        out = [
            f'<svg role="img" aria-labelledby="{t} {d}" viewBox="0 0 {_W} {_H + 22 * len(self.legend)}" '
            f'width="{_W}" xmlns="http://www.w3.org/2000/svg">',
            f'<title id="{t}">{_e(self.title)}</title><desc id="{d}">{_e(self.desc)}</desc>',
        ]
        (x0, x1), (y0, y1) = self.x, self.y
        (ox, oy), (ex, _), (_, ty) = self._px(x0, y0), self._px(x1, y0), self._px(x0, y1)
        out.append(f'<line x1="{ox}" y1="{oy}" x2="{ex}" y2="{oy}" stroke="#333"/>')
        out.append(f'<line x1="{ox}" y1="{oy}" x2="{ox}" y2="{ty}" stroke="#333"/>')
        for v, text in x_ticks:
            px, py = self._px(v, y0)
            out.append(
                f'<text x="{px}" y="{py + 16}" font-size="11" text-anchor="middle" fill="#222">{_e(text)}</text>'
            )
        for v, text in y_ticks:
            px, py = self._px(x0, v)
            out.append(
                f'<text x="{px - 6}" y="{py + 4}" font-size="11" text-anchor="end" fill="#222">{_e(text)}</text>'
            )
        mid = _W / 2
        out.append(
            f'<text x="{mid}" y="{_H - 10}" font-size="12" text-anchor="middle" fill="#222">{_e(self.x_label)}</text>'
        )
        out.append(f'<text x="12" y="{_PAD - 14}" font-size="12" fill="#222">{_e(self.y_label)}</text>')
        out.extend(self.parts)
        for i, (name, colour, pattern) in enumerate(self.legend):
            y = _H + 14 + 22 * i
            dash_attr = f' stroke-dasharray="{pattern}"' if pattern else ""
            out.append(
                f'<line x1="{_PAD}" y1="{y}" x2="{_PAD + 30}" y2="{y}" stroke="{colour}" stroke-width="2"{dash_attr}/>'
            )
            out.append(f'<text x="{_PAD + 38}" y="{y + 4}" font-size="12" fill="#222">{_e(name)}</text>')
        out.append("</svg>")
        return f"<figure><figcaption>{_e(self.title)}</figcaption>{''.join(out)}</figure>"


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["bundle_id"], r["bundle_version"], r["label"])].append(r)
    return dict(sorted(out.items()))


def _by_site(rows: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["site"]].append(r)
    return dict(sorted(out.items(), key=lambda kv: _site(kv[0])))


def _distribution_plots(report: dict[str, Any]) -> list[str]:
    edges = report["psi"]["score_edges"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    plots = []
    for n, ((bid, ver, label), rows) in enumerate(_groups(report["tables"]["score_histograms"]["rows"]).items()):
        p = _Plot(f"dist{n}", f"Score distribution: {bid} {ver}, {label}",
                  f"Share of {label} scores in each of 20 bins from 0 to 1, per site, against the bundle's "
                  "validation reference where the bundle has one. Counts are in the tables below.",
                  (0.0, 1.0), (0.0, 0.0), "score", "share of scores")  # fmt: skip
        lines: list[tuple[str, list[float]]] = []
        for site, srows in _by_site(rows).items():
            counts = [0] * (len(edges) - 1)
            for r in srows:
                counts[r["bin"]] += r["n"]
            total = sum(counts) or 1
            lines.append((f"{_site(site)} (n={sum(counts)})", [c / total for c in counts]))
        ref = report["references"].get(f"{bid}@{ver}", {}).get("scores", {}).get(label)
        if ref:
            lines.append((f"reference (n={sum(ref)})", [c / (sum(ref) or 1) for c in ref]))
        top = max((max(v) for _, v in lines), default=1.0) or 1.0
        p.y = (0.0, top * 1.1)
        for i, (name, shares) in enumerate(lines):
            is_ref = name.startswith("reference")
            p.line(
                name,
                list(zip(centres, shares, strict=True)),
                i,
                dash="1 3" if is_ref else None,
                colour="#000000" if is_ref else "",
            )
        plots.append(
            p.svg([(x / 5, f"{x / 5:.1f}") for x in range(6)], [(top * k / 4, f"{top * k / 4:.2f}") for k in range(5)])
        )
    return plots


def _drift_plots(report: dict[str, Any]) -> list[str]:
    rows = report["tables"]["drift"]["rows"]
    weeks = sorted({r["week"] for r in rows})
    plots = []
    for n, ((bid, ver, label), grows) in enumerate(_groups(rows).items()):
        has_ref = any(r["psi_reference"] is not None for r in grows)
        col = "psi_reference" if has_ref else "psi_fleet"
        against = "the bundle's reference" if has_ref else "the other sites pooled"
        vals = [r[col] for r in grows if r[col] is not None]
        top = max([*vals, report["references"].get(f"{bid}@{ver}", {}).get("drift", {}).get("psi_alert", 0.25)]) * 1.1
        alert = (
            report["references"].get(f"{bid}@{ver}", {}).get("drift", report["psi"]["alert"]["default"])["psi_alert"]
        )
        p = _Plot(f"drift{n}", f"Drift over time: {bid} {ver}, {label}",
                  f"Weekly population stability index of each site's {label} scores against {against}; "
                  f"the dashed red line is the alert level {alert}.",
                  (0.0, max(len(weeks) - 1, 1)), (0.0, top or 1.0), "week (Monday)",
                  f"PSI against {against}")  # fmt: skip
        for i, (site, srows) in enumerate(_by_site(grows).items()):
            pts = [(float(weeks.index(r["week"])), r[col]) for r in sorted(srows, key=lambda r: r["week"])]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                p.line(_site(site), pts if len(pts) > 1 else pts * 2, i)
        p.hline(alert, f"alert level {alert}")
        plots.append(
            p.svg([(float(i), w) for i, w in enumerate(weeks)], [(top * k / 4, f"{top * k / 4:.2f}") for k in range(5)])
        )
    return plots


def _roc_plots(report: dict[str, Any]) -> list[str]:
    points = roc_points(report["tables"]["calibration"]["rows"])
    per_label: dict[tuple[str, str, str], dict[Any, list[tuple[float, float]]]] = defaultdict(dict)
    for (site, bid, ver, label), pts in points.items():
        per_label[(bid, ver, label)][site] = pts
    plots = []
    for n, ((bid, ver, label), sites) in enumerate(sorted(per_label.items())):
        p = _Plot(f"roc{n}", f"ROC: {bid} {ver}, {label}",
                  f"Sensitivity against 1 - specificity of {label} at the thresholds 0.05 to 0.95, per site, from "
                  "radiologists' verdicts and confirmed outcomes; the calibration table below gives each point.",
                  (0.0, 1.0), (0.0, 1.0), "1 - specificity", "sensitivity")  # fmt: skip
        for i, (site, pts) in enumerate(sorted(sites.items(), key=lambda kv: _site(kv[0]))):
            p.line(_site(site), pts, i)
        p.parts.insert(0, '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#767676" stroke-dasharray="2 4"/>'.format(
            *p._px(0, 0), *p._px(1, 1)))  # fmt: skip
        ticks = [(k / 5, f"{k / 5:.1f}") for k in range(6)]
        plots.append(p.svg(ticks, ticks))
    return plots


def _table(name: str, caption: str, table: dict[str, Any]) -> str:
    head = "".join(f'<th scope="col">{_e(c)}</th>' for c in table["columns"])
    body = []
    for r in table["rows"]:
        cells = "".join(f"<td>{_e(_site(r[c]) if c == 'site' else _fmt(r[c]))}</td>" for c in table["columns"])
        body.append(f"<tr>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(table["columns"])}">no rows for these filters</td></tr>')
    return (
        f'<div class="scroll" role="region" aria-labelledby="cap-{name}" tabindex="0"><table>'
        f'<caption id="cap-{name}">{_e(caption)}</caption><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


_CSS = """
body{font-family:system-ui,sans-serif;color:#1a1a1a;background:#fff;margin:1.5rem;line-height:1.4}
h1{font-size:1.5rem}h2{font-size:1.25rem;margin-top:2rem}caption{text-align:left;font-weight:600;padding:.3rem 0}
table{border-collapse:collapse;font-size:.85rem}th,td{border:1px solid #bbb;padding:.2rem .4rem;text-align:right}
th{background:#eee}.scroll{overflow-x:auto;max-height:32rem;margin-bottom:1rem}.plots{display:flex;flex-wrap:wrap;gap:1rem}
.alert{color:#8a0010;font-weight:600}figure{margin:0}figcaption{font-weight:600;font-size:.95rem}
"""

_TABLES = [
    ("volume", "Volume per site, bundle version and week"),
    ("labels", "Scores and positive rates per label (quantiles of finding scores; positive rate per study)"),
    ("drift", "Drift: PSI of the week's scores against the reference and against the other sites pooled"),
    ("refusals", "Refusals by reason (the box's daily statistics; rate = refused / images)"),
    ("concordance", "Concordance with radiologists' feedback and confirmed outcomes"),
    ("calibration", "Calibration per site and label: choose an operating point from this table"),
]


def render_html(report: dict[str, Any]) -> str:
    """The report document (:func:`appliance.central.report.build_report`) as a self-contained HTML page."""
    f = report["filters"]
    scope = ", ".join(f"{k} {v}" for k, v in f.items() if v) or "all sites, all dates"
    alerts = [r for r in report["tables"]["drift"]["rows"] if r["alert_reference"] or r["alert_fleet"]]
    alert_items = "".join(
        f"<li>{_e(_site(r['site']))}: {_e(r['bundle_id'])} {_e(r['bundle_version'])}, {_e(r['label'])}, week of "
        f"{_e(r['week'])} (PSI against the reference {_e(_fmt(r['psi_reference']))}, "
        f"against the fleet {_e(_fmt(r['psi_fleet']))})</li>"
        for r in alerts
    )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Central report: {_e(scope)}</title><style>{_CSS}</style></head><body>",
        "<header><h1>Central report</h1>",
        f"<p>Store {_e(report['store'])} (schema version {_e(report['store_version'])}); {_e(scope)}; engine "
        f"{_e(report['engine'])}; generated {_e(report['generated_at'])}.</p></header><main>",
        "<h2>Drift alerts</h2>",
        f'<ul class="alert">{alert_items}</ul>' if alerts else "<p>No site drifted beyond the alert level.</p>",
        f"<p>{_e(report['psi']['formula'])}; epsilon = {_e(report['psi']['epsilon'])}. Alert: "
        f"{_e(report['psi']['alert']['rule'])} (the bundle manifest's drift settings, else "
        f"{_e(report['psi']['alert']['default'])}).</p>",
        "<h2>Score distributions against the reference</h2>",
        '<div class="plots">' + "".join(_distribution_plots(report)) + "</div>",
        "<h2>Drift over time</h2>",
        '<div class="plots">' + "".join(_drift_plots(report)) + "</div>",
        "<h2>ROC per site</h2>",
        '<div class="plots">' + "".join(_roc_plots(report)) + "</div>",
        "<h2>Tables</h2>",
    ]
    parts.extend(_table(name, caption, report["tables"][name]) for name, caption in _TABLES)
    parts.append("</main></body></html>")
    return "\n".join(parts)
