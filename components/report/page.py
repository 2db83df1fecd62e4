"""The report: one self-contained HTML page of the registry (pictures embedded, no network needed).

A row per family: its champion, primary score with split and unit, the decision on its latest
version, its sample grid next to real test images; then, per family, its score across registered
versions and the training curves of its latest version.
"""

from __future__ import annotations

import base64
import math
from html import escape

from mlflow.tracking import MlflowClient

from components.data.prepared import PreparedData
from components.registry.summary import FamilySummary, RegistrySummary, real_test_images, registry_summary
from components.report.plots import Series, line_chart

DECISION_BADGES = {
    "promoted": ("promoted", "good"),
    "rejected": ("kept champion", "neutral"),
    "manual": ("promoted by hand", "good"),
    "": ("not decided", "bad"),
}

STYLE = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --panel: #f9fafb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; }
header { padding: 22px 32px 14px; border-bottom: 1px solid var(--line); background: var(--panel); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); }
main { padding: 18px 32px 40px; }
h2 { font-size: 17px; margin: 26px 0 10px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 10px 12px; border-bottom: 1px solid var(--line); }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); font-weight: 600; }
td.family { font-weight: 600; white-space: nowrap; }
td.family small, .muted { color: var(--muted); font-weight: 400; }
.value { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600; }
.badge.good { background: #dcfce7; color: #166534; }
.badge.neutral { background: #fef9c3; color: #854d0e; }
.badge.bad { background: #fee2e2; color: #991b1b; }
.reason { color: var(--muted); font-size: 12px; max-width: 340px; margin-top: 4px; }
figure { display: inline-block; margin: 0 10px 0 0; text-align: center; }
figure img { width: 168px; image-rendering: pixelated; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 11px; color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 16px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.card h3 { margin: 0 0 6px; font-size: 15px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.charts > div { flex: 1 1 280px; min-width: 0; }
.charts h4 { margin: 4px 0; font-size: 12px; font-weight: 600; color: var(--muted); }
svg.chart { width: 100%; height: auto; }
svg .grid { stroke: #eef0f3; } svg .axis { stroke: #9ca3af; }
svg text { font: 11px system-ui, sans-serif; fill: #4b5563; } svg .axis-label { fill: #111827; }
svg .legend { fill: #111827; } svg .empty { fill: #9ca3af; font-size: 13px; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 24px; }
"""


def _image(png: bytes | None, caption: str) -> str:
    if png is None:
        return f'<figure><div class="muted">{escape(caption)}: none</div></figure>'
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _score(family: FamilySummary) -> str:
    if family.champion_value is None or not math.isfinite(family.champion_value):
        return '<span class="muted">no champion</span>'
    unit = f" {escape(family.info.unit)}" if family.info.unit else ""
    split = f", {escape(family.info.split)} split" if family.info.split else ""
    return (
        f'<div class="value">{family.champion_value:.4g}<span class="muted">{unit}</span></div>'
        f'<div class="muted">{escape(family.info.label)}{split}; lower is better</div>'
    )


def _row(family: FamilySummary) -> str:
    label, tone = DECISION_BADGES.get(family.decision, (family.decision, "neutral"))
    champion = f"v{family.champion}" if family.champion is not None else "-"
    return (
        f'<tr class="family-row" data-family="{escape(family.family)}">'
        f'<td class="family">{escape(family.family)}<br><small>{escape(family.name)}<br>data {escape(family.data_version[:12])}</small></td>'
        f'<td><div class="value">{champion}</div><div class="muted">latest v{family.latest}</div></td>'
        f"<td>{_score(family)}</td>"
        f'<td><span class="badge {tone}">{escape(label)}</span> <span class="muted">v{family.latest}</span>'
        f'<div class="reason">{escape(family.reason)}</div></td>'
        f"<td>{_image(family.samples_png, f'samples of v{family.samples_version}')}"
        f"{_image(family.real_png, 'real test images')}</td>"
        "</tr>"
    )


def _charts(family: FamilySummary) -> str:
    scores = Series(
        family.metric,
        [(s.version, s.value) for s in family.scores],
        hollow={s.version for s in family.scores if s.decision not in ("promoted", "manual")},
        ringed={family.champion} if family.champion is not None else set(),
    )
    unit = f" ({family.info.unit})" if family.info.unit else ""
    across = line_chart([scores], x_label="registered version", y_label=f"{family.info.label}{unit}")
    curves = line_chart(
        [Series(name, points, dots=False) for name, points in family.curves.items()],
        x_label="epoch",
        y_label="training metric",
    )
    return (
        f'<section class="card" data-family="{escape(family.family)}"><h3>{escape(family.name)}</h3>'
        '<div class="charts">'
        f"<div><h4>{escape(family.info.label)} across versions</h4>"
        f"{across}</div>"
        f"<div><h4>Training curves of v{family.latest}</h4>{curves}</div>"
        "</div></section>"
    )


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def render_report(summary: RegistrySummary) -> str:
    """The whole page as one HTML string."""
    if summary.families:
        rows = "".join(_row(f) for f in summary.families)
        body = (
            "<h2>Champions</h2><table><thead><tr><th>Family</th><th>Champion</th><th>Primary metric</th>"
            f"<th>Last run's decision</th><th>Samples and real images</th></tr></thead><tbody>{rows}</tbody></table>"
            '<h2>Scores and training curves</h2><p class="muted">Scores per registered version: filled '
            "points were promoted, hollow ones were not; the ringed point is the champion.</p>"
            f'<div class="cards">{"".join(_charts(f) for f in summary.families)}</div>'
        )
    else:
        body = '<p class="muted">Nothing is registered yet: run <code>genpipe run</code>.</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>genpipe report</title><style>{STYLE}</style></head><body>"
        f"<header><h1>genpipe report</h1><p>{_count(len(summary.families), 'model family', 'model families')} registered in "
        f"<code>{escape(summary.tracking_uri)}</code> &middot; generated {escape(summary.generated)}</p></header>"
        f"<main>{body}</main>"
        "<footer>Scores are the primary metric on the validation split (the split promotion decides on) of "
        "the data version shown with its model; test-split figures are on each version's tags; "
        "the real images are the test split of the project's current data.</footer>"
        "</body></html>"
    )


def report_html(client: MlflowClient, production_prefix: str, prepared: PreparedData | None) -> str:
    """Read the registry and render the report page; `prepared` supplies the real test images."""
    return render_report(registry_summary(client, production_prefix, real_test_images(prepared)))
