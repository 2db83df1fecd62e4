"""Small line charts as inline SVG: the report page draws its plots itself, so it needs no plotting
library and no network to open."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
WIDTH, HEIGHT = 340, 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 12, 12, 38


DOTS_UP_TO = 12  # a curve with more points than this is drawn as a line alone


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    dots: bool = True  # mark every point (always done for a curve of few points)
    # Points drawn hollow (e.g. versions that were not promoted); the others are filled.
    hollow: set[float] = field(default_factory=set)
    ringed: set[float] = field(default_factory=set)  # points circled (e.g. the champion)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering low..high."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high - low < 1e-12:
        low, high = low - (abs(low) or 1) * 0.05, high + (abs(high) or 1) * 0.05
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.1e}"
    return f"{value:.4g}"


def _legend_positions(labels: list[str]) -> list[tuple[float, float]]:
    """Where each legend entry goes: rows under the chart, wrapped at its width."""
    positions, x, y = [], float(MARGIN_LEFT), HEIGHT + 12.0
    for label in labels:
        width = 24 + 6.2 * len(label)  # swatch, gap, and about the width of an 11 px character
        if x + width > WIDTH and x > MARGIN_LEFT:
            x, y = float(MARGIN_LEFT), y + 16
        positions.append((x, y))
        x += width + 10
    return positions


def line_chart(series: list[Series], *, x_label: str, y_label: str) -> str:
    """An SVG chart of one or more series over whole-numbered x (epochs, versions), with a legend."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    if not xs or not ys:
        return (
            f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">'
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">no data</text></svg>'
        )
    x_ticks = sorted({round(t) for t in nice_ticks(min(xs), max(xs), 6) if abs(t - round(t)) < 1e-9})
    x_ticks = x_ticks or [round(min(xs))]
    y_ticks = nice_ticks(min(ys), max(ys), 5)
    x_low, x_high = min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs))
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = y_ticks[0], y_ticks[-1]
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    legend = _legend_positions([item.label for item in series]) if len(series) > 1 else []
    height = max([HEIGHT, *(y + 8 for _, y in legend)])
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img">']
    for tick in y_ticks:
        y = py(tick)
        parts.append(
            f'<line class="grid" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(tick)}</text>'
        )
    for tick in x_ticks:
        x = px(tick)
        parts.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{HEIGHT - MARGIN_BOTTOM}" y2="{HEIGHT - MARGIN_BOTTOM + 4}"/>'
        )
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{HEIGHT - MARGIN_BOTTOM + 16}" text-anchor="middle">{_label(tick)}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" '
        f'y1="{HEIGHT - MARGIN_BOTTOM}" y2="{HEIGHT - MARGIN_BOTTOM}"/>'
    )
    parts.append(
        f'<text class="axis-label" x="{MARGIN_LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text class="axis-label" transform="translate(13 {MARGIN_TOP + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    for index, item in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        points = [(x, y) for x, y in item.points if math.isfinite(y)]
        if len(points) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in points if item.dots or len(points) <= DOTS_UP_TO else []:
            fill = "#fff" if x in item.hollow else colour
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{fill}" stroke="{colour}" stroke-width="1.5">'
                f"<title>{escape(item.label)}: {_label(x)}, {y:.5g}</title></circle>"
            )
            if x in item.ringed:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="7.5" fill="none" stroke="#ca8a04" stroke-width="2"/>'
                )
    for index, (x, y) in enumerate(legend):
        colour = PALETTE[index % len(PALETTE)]
        parts.append(f'<rect x="{x}" y="{y - 4}" width="12" height="3" fill="{colour}"/>')
        parts.append(f'<text class="legend" x="{x + 17}" y="{y}">{escape(series[index].label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
