"""Line charts as inline SVG, drawn on the server: no script, no build step, and a page
that shows its plots even with JavaScript off."""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT, PAD = 640, 180, 36
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2")


@dataclass(frozen=True)
class Series:
    name: str
    points: list[tuple[float, float]]  # (time, value), in time order


def line_chart(title: str, unit: str, series: list[Series]) -> str:
    """An SVG chart of ``series`` on shared axes; each line's points are circles too, so
    a single reading still shows."""
    drawn = [s for s in series if s.points]
    head = f'<figure class="chart" data-title="{escape(title)}"><figcaption>{escape(title)}'
    if not drawn:
        return head + ' <span class="muted">(no data)</span></figcaption></figure>'
    ts = [t for s in drawn for t, _ in s.points]
    vs = [v for s in drawn for _, v in s.points]
    t0, t1 = min(ts), max(ts)
    v0, v1 = min(0.0, min(vs)), max(vs)
    if t1 == t0:
        t1 = t0 + 1
    if v1 == v0:
        v1 = v0 + 1

    def x(t: float) -> float:
        return PAD + (t - t0) / (t1 - t0) * (WIDTH - 2 * PAD)

    def y(v: float) -> float:
        return HEIGHT - PAD / 2 - (v - v0) / (v1 - v0) * (HEIGHT - PAD)

    parts = [head + f' <span class="muted">({escape(unit)})</span></figcaption>',
             f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{escape(title)}">',
             f'<line x1="{PAD}" y1="{y(v0):.1f}" x2="{WIDTH - PAD}" y2="{y(v0):.1f}" class="axis"/>',
             f'<text x="2" y="{y(v1) + 4:.1f}" class="tick">{v1:.4g}</text>',
             f'<text x="2" y="{y(v0):.1f}" class="tick">{v0:.4g}</text>',
             f'<text x="{PAD}" y="{HEIGHT - 2}" class="tick">{_clock(t0)}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 2}" class="tick" text-anchor="end">{_clock(t1)}</text>']
    for i, s in enumerate(drawn):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in s.points)
        parts.append(f'<g class="series" data-name="{escape(s.name)}" data-points="{len(s.points)}">'
                     f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.extend(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="2" fill="{colour}"><title>{escape(s.name)} '
                     f'{v:.4g} at {_clock(t)}</title></circle>' for t, v in s.points)
        parts.append("</g>")
    parts.append("</svg>")
    parts.append('<div class="legend">' + " ".join(
        f'<span style="color:{COLOURS[i % len(COLOURS)]}">&#9632; {escape(s.name)}</span>'
        for i, s in enumerate(drawn)) + "</div></figure>")
    return "".join(parts)


def _clock(t: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.gmtime(t))
