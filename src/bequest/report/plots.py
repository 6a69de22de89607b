"""The reports' own figures: line charts written as SVG text. A chart is a few hundred bytes of markup
drawn in microseconds (every training verb draws one when it finishes), scales in the browser, and needs
no plotting library; the figures verbs draw themselves (heat maps, the lineage tree) stay PNGs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from bequest.report.metrics import series

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 300, 62, 170, 28, 42  # canvas, then margins around the plot area


@dataclass
class Line:
    label: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False
    dots: bool = True


def curves(runs: list[tuple[str, list[dict]]], stream: bool = False) -> list[tuple[str, bytes]]:
    """(name, SVG) charts of training runs from their metrics.jsonl rows: loss (training and validation)
    against steps, and validation accuracy where there is one; a colour per run. `stream`: the runs came one
    after the other, so each starts where the one before ended."""
    if not any(log for _, log in runs):
        return []
    loss, accuracy, offset = [], [], 0
    for k, (name, log) in enumerate(runs):
        color, label = COLORS[k % len(COLORS)], f"{name} " if name else ""
        shift = [(x + offset, y) for x, y in series(log, "loss")]
        loss.append(Line(f"{label}training", shift, color, dashed=True, dots=False))
        loss.append(Line(f"{label}validation", [(x + offset, y) for x, y in series(log, "eval_loss")], color))
        accuracy.append(Line(f"{label}validation", [(x + offset, y) for x, y in series(log, "eval_accuracy")], color))
        if stream:
            offset += max((r["step"] for r in log), default=0)
    charts = [("loss", chart("loss", "step", "loss", loss))]
    if any(line.points for line in accuracy):
        charts.append(("accuracy", chart("validation accuracy", "step", "accuracy", accuracy)))
    return charts


def chart(title: str, xlabel: str, ylabel: str, lines: list[Line], hlines: list[tuple[str, float]] = (),
          vlines: list[tuple[str, float]] = ()) -> bytes:
    """One chart: lines, labelled horizontal and vertical rules (dashed), ticks, a legend to the right."""
    lines = [line for line in lines if line.points]
    xs = [x for line in lines for x, _ in line.points] + [x for _, x in vlines] or [0.0, 1.0]
    ys = [y for line in lines for _, y in line.points] + [y for _, y in hlines] or [0.0, 1.0]
    (x0, x1), (y0, y1) = _span(min(xs), max(xs)), _span(min(ys), max(ys))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y):
        return TOP + (y1 - y) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{LEFT + pw / 2}" y="17" text-anchor="middle" font-size="13">{escape(title)}</text>']
    ticks, step = _ticks(x0, x1)
    for v in ticks:
        out.append(f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#eee"/>'
                   f'<text x="{px(v):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{_label(v, step)}</text>')
    ticks, step = _ticks(y0, y1)
    for v in ticks:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 5}" y="{py(v) + 4:.1f}" text-anchor="end">{_label(v, step)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(13 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">'
               f"{escape(ylabel)}</text>")
    legend = []
    for label, y in hlines:
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="black" '
                   'stroke-dasharray="5 3"/>')
        legend.append((label, "black", True))
    for k, (label, x) in enumerate(vlines):
        color = COLORS[(k + 3) % len(COLORS)]
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="{color}" '
                   'stroke-dasharray="2 3"/>')
        legend.append((label, color, True))
    for line in lines:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line.points)
        dash = ' stroke-dasharray="4 3" opacity="0.7"' if line.dashed else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{line.color}" stroke-width="1.5"{dash}/>')
        if line.dots:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{line.color}"/>' for x, y in line.points]
        legend.append((line.label, line.color, line.dashed))
    for k, (label, color, dashed) in enumerate(legend):
        y = TOP + 8 + 16 * k
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<line x1="{W - RIGHT + 10}" x2="{W - RIGHT + 30}" y1="{y}" y2="{y}" stroke="{color}" '
                   f'stroke-width="2"{dash}/><text x="{W - RIGHT + 35}" y="{y + 4}">{escape(label[:26])}</text>')
    out.append("</svg>")
    return "\n".join(out).encode()


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A range with room around the data (and some width when every value is the same)."""
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float) -> tuple[list[float], float]:
    """About five round values within [lo, hi], and their spacing."""
    step = 10 ** math.floor(math.log10((hi - lo) / 5))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 6)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step) + 1)], step


def _label(v: float, step: float) -> str:
    if max(abs(v), step) >= 1e5 or step < 1e-3:
        return f"{v:.2g}"
    return f"{v:.{max(0, -math.floor(math.log10(step)))}f}"
