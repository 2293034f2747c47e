"""Inline SVG charts and value formats for the operator's console (/ui): drawn on the server, no
JavaScript, no assets. Every label goes through `escape`; charts return `Markup` ready for a template."""
from __future__ import annotations

import json
import math
import time

from markupsafe import Markup, escape

# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
FONT = 'font-family="system-ui,sans-serif" font-size="11"'


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}" if v == int(v) else f"{v:.1f}"
    return f"{v:.3g}"


class _Frame:
    """Plot area of a chart: maps data to pixels and draws axes, grid and labels."""

    def __init__(self, width: int, height: int, xs: list[float], ys: list[float], *, left: int = 48,
                 right: int = 16, top: int = 14, bottom: int = 38, integer_x: bool = False) -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
        y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        pad = (y_hi - y_lo) * 0.08 or 0.05
        self.yticks = nice_ticks(y_lo - pad, y_hi + pad)
        if integer_x:
            span = max(1, int(x_hi - x_lo))
            step = next(s for s in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100) if span / s <= 10) \
                if span <= 1000 else math.ceil(span / 10)
            self.xticks = sorted({int(x_lo)} | set(range(step, int(x_hi) + 1, step)))
            self.x_lo, self.x_hi = x_lo - 0.5, x_hi + 0.5
        else:
            self.xticks = nice_ticks(x_lo, x_hi, 6)
            self.x_lo, self.x_hi = self.xticks[0], self.xticks[-1]
        self.y_lo, self.y_hi = self.yticks[0], self.yticks[-1]

    def x(self, v: float) -> float:
        span = (self.x_hi - self.x_lo) or 1.0
        return round(self.left + (v - self.x_lo) / span * (self.width - self.left - self.right), 1)

    def y(self, v: float) -> float:
        span = (self.y_hi - self.y_lo) or 1.0
        return round(self.height - self.bottom - (v - self.y_lo) / span * (self.height - self.top - self.bottom), 1)

    def axes(self, x_label: str, y_label: str) -> list[str]:
        out = []
        x0, x1 = self.left, self.width - self.right
        for t in self.yticks:
            y = self.y(t)
            out.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#e3e3e3"/>'
                       f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end" fill="#555">{_fmt(t)}</text>')
        base = self.height - self.bottom
        for t in self.xticks:
            x = self.x(t)
            out.append(f'<line x1="{x}" y1="{base}" x2="{x}" y2="{base + 4}" stroke="#888"/>'
                       f'<text x="{x}" y="{base + 16}" text-anchor="middle" fill="#555">{_fmt(t)}</text>')
        out.append(f'<line x1="{x0}" y1="{base}" x2="{x1}" y2="{base}" stroke="#888"/>')
        out.append(f'<text x="{(x0 + x1) / 2}" y="{self.height - 4}" text-anchor="middle" fill="#333">'
                   f'{escape(x_label)}</text>')
        mid = (self.top + base) / 2
        out.append(f'<text x="11" y="{mid}" transform="rotate(-90 11 {mid})" text-anchor="middle" fill="#333">'
                   f'{escape(y_label)}</text>')
        return out


def _svg(width: int, height: int, label: str, body: list[str], css_class: str) -> Markup:
    return Markup(f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                  f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" {FONT}>'
                  f'<title>{escape(label)}</title>{"".join(body)}</svg>')


def _segments(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of consecutive known points (a gap where a value is unknown)."""
    runs, run = [], []
    for x, y in points:
        if y is None or not math.isfinite(y):
            if run:
                runs.append(run)
            run = []
        else:
            run.append((x, y))
    if run:
        runs.append(run)
    return runs


def value_vs_n(curves: dict[str, list], served: tuple[str, int] | None = None, served_value: float | None = None,
               served_se: float | None = None, *, width: int = 560, height: int = 250,
               title: str = "estimated value versus N") -> Markup:
    """One line per prompt: its estimated value at N = 1, 2, ... (None: unknown or infeasible N); the
    served arm (prompt, N) marked with a ring (and its ± s.e. when given)."""
    series = {str(p): [(i + 1, v) for i, v in enumerate(vals)] for p, vals in curves.items() if vals}
    ys = [v for pts in series.values() for _, v in pts if v is not None and math.isfinite(v)]
    xs = [x for pts in series.values() for x, _ in pts]
    if served_value is not None and math.isfinite(served_value):
        se = served_se if served_se is not None and math.isfinite(served_se) else 0.0
        ys += [served_value - se, served_value + se]
    if served:
        xs.append(served[1])
    if not ys:
        return Markup('<p class="muted">No estimates to plot yet.</p>')
    legend_w = 130
    frame = _Frame(width, height, xs or [1], ys, right=legend_w, integer_x=True)
    body = frame.axes("N (completions per request)", "estimated value")
    for i, (prompt, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        for run in _segments(pts):
            coords = " ".join(f"{frame.x(x)},{frame.y(y)}" for x, y in run)
            body.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
            for x, y in run:
                body.append(f'<circle cx="{frame.x(x)}" cy="{frame.y(y)}" r="2.6" fill="{colour}">'
                            f'<title>{escape(prompt)}, N={x}: {y:.4g}</title></circle>')
        ly = frame.top + 6 + i * 16
        lx = width - legend_w + 12
        body.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{colour}" stroke-width="3"/>'
                    f'<text x="{lx + 24}" y="{ly + 4}" fill="#222" class="legend">{escape(_short(prompt))}</text>')
    if served:
        prompt, n = served
        value = served_value
        if value is None:
            value = next((v for x, v in series.get(prompt, []) if x == n), None)
        if value is not None and math.isfinite(value):
            cx, cy = frame.x(n), frame.y(value)
            if served_se is not None and math.isfinite(served_se) and served_se > 0:
                y0, y1 = frame.y(value - served_se), frame.y(value + served_se)
                body.append(f'<line x1="{cx}" y1="{y0}" x2="{cx}" y2="{y1}" stroke="#111" stroke-width="1.5"/>'
                            f'<line x1="{cx - 4}" y1="{y0}" x2="{cx + 4}" y2="{y0}" stroke="#111"/>'
                            f'<line x1="{cx - 4}" y1="{y1}" x2="{cx + 4}" y2="{y1}" stroke="#111"/>')
            body.append(f'<circle class="served" cx="{cx}" cy="{cy}" r="7" fill="none" stroke="#111" stroke-width="2">'
                        f'<title>served: {escape(prompt)}, N={n}: {value:.4g}</title></circle>')
            anchor = "end" if cx > (width - legend_w) * 0.75 else "start"
            dx = -10 if anchor == "end" else 10
            dy = 18 if cy < frame.top + (height - frame.top - frame.bottom) * 0.3 else -9  # below when near the top
            body.append(f'<text x="{cx + dx}" y="{cy + dy}" text-anchor="{anchor}" font-weight="600" fill="#111" '
                        f'stroke="#fff" stroke-width="3" paint-order="stroke">'
                        f'served {escape(_short(prompt))} N={n}</text>')
        ly = frame.top + 6 + len(series) * 16 + 6
        lx = width - legend_w + 12
        body.append(f'<circle cx="{lx + 9}" cy="{ly}" r="6" fill="none" stroke="#111" stroke-width="2"/>'
                    f'<text x="{lx + 24}" y="{ly + 4}" fill="#222">served arm</text>')
    return _svg(width, height, title, body, "chart curve")


def trajectory(series: dict[str, list], budget: int | None = None, *, width: int = 520, height: int = 200,
               title: str = "estimate trajectory") -> Markup:
    """Per tier, the estimated value of the arm PSST would choose after each round, against the
    completions spent so far; a marker (with the arm) wherever the choice changed."""
    clean = {}
    for tier, rows in series.items():
        pts = [(float(r[0]), r[1], r[2], r[3]) for r in rows or []
               if isinstance(r, (list, tuple)) and len(r) >= 4 and isinstance(r[0], (int, float))]
        if pts:
            clean[str(tier)] = pts
    ys = [p[3] for pts in clean.values() for p in pts if p[3] is not None and math.isfinite(p[3])]
    if not ys:
        return Markup('<p class="muted">No trajectory recorded.</p>')
    xs = [0.0] + [p[0] for pts in clean.values() for p in pts] + ([float(budget)] if budget else [])
    frame = _Frame(width, height, xs, ys, right=74, top=26)
    body = frame.axes("completions spent", "value of chosen arm")
    if budget:
        bx = frame.x(budget)
        body.append(f'<line x1="{bx}" y1="{frame.top}" x2="{bx}" y2="{height - frame.bottom}" stroke="#999" '
                    f'stroke-dasharray="4 3"/><text x="{bx}" y="{frame.top - 4}" text-anchor="middle" '
                    f'fill="#777">budget</text>')
    ends: list[list] = []
    for i, (tier, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        for run in _segments([(p[0], p[3]) for p in pts]):
            coords = " ".join(f"{frame.x(x)},{frame.y(y)}" for x, y in run)
            body.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        previous = None
        for spent, prompt, n, value in pts:
            arm = (prompt, n)
            if value is not None and math.isfinite(value) and arm != previous:
                body.append(f'<circle cx="{frame.x(spent)}" cy="{frame.y(value)}" r="3.5" fill="#fff" '
                            f'stroke="{colour}" stroke-width="2"><title>{escape(tier)} after {spent:.0f} completions:'
                            f' {escape(prompt)} N={escape(n)}, {value:.4g}</title></circle>')
            previous = arm
        last = pts[-1]
        if last[3] is not None and math.isfinite(last[3]):
            ends.append([frame.y(last[3]) + 4, colour, f"{_short(str(last[1]), 8)} N={last[2]}"])
        lx = frame.left + i * 90
        body.append(f'<line x1="{lx}" y1="9" x2="{lx + 16}" y2="9" stroke="{colour}" stroke-width="3"/>'
                    f'<text x="{lx + 21}" y="13" fill="#222" class="legend">{escape(_short(tier, 10))}</text>')
    ends.sort()
    for k in range(1, len(ends)):  # end labels never overlap
        ends[k][0] = max(ends[k][0], ends[k - 1][0] + 13)
    for y, colour, text in ends:
        body.append(f'<text x="{width - frame.right + 6}" y="{y}" fill="{colour}" font-weight="600">'
                    f'{escape(text)}</text>')
    return _svg(width, height, title, body, "chart trajectory")


def share_bar(ratio: float | None, *, width: int = 140, height: int = 12) -> Markup:
    """A bar of the share of a cap used (reserved included): green, amber from 80 %, red at the cap."""
    if ratio is None or not math.isfinite(ratio):
        return Markup('<span class="muted">no cap</span>')
    colour = "#2e7d32" if ratio < 0.8 else "#ef6c00" if ratio < 1.0 else "#c62828"
    return bar(ratio, colour, f"{ratio:.1%} of cap used", width=width, height=height)


def bar(ratio: float, colour: str = PALETTE[0], label: str = "", *, width: int = 140, height: int = 12) -> Markup:
    """A horizontal bar filled to `ratio` (clipped to 0..1)."""
    shown = max(0.0, min(1.0, ratio)) if math.isfinite(ratio) else 0.0
    label = label or f"{ratio:.1%}"
    return Markup(f'<svg class="bar" width="{width}" height="{height}" role="img" aria-label="{label}">'
                  f'<title>{label}</title><rect width="{width}" height="{height}" rx="3" fill="#e8e8e8"/>'
                  f'<rect width="{round(width * shown, 1)}" height="{height}" rx="3" fill="{colour}"/></svg>')


def _short(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- value formats (Jinja filters) --------------------------------------------------------------
def money(x) -> str:
    if x is None:
        return "—"
    return "$0" if x == 0 else f"${x:,.2f}" if abs(x) >= 100 else f"${x:.4g}"


def num(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def ts(x) -> str:
    return "—" if not x else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(x))


def rel(x) -> str:
    if not x:
        return ""
    delta = x - time.time()
    s = abs(delta)
    text = f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else \
        f"{s // 3600:.0f} h {s % 3600 / 60:.0f} min" if s < 172800 else f"{s / 86400:.1f} days"
    return f"in {text}" if delta >= 0 else f"{text} ago"


def pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


FILTERS = {"money": money, "num": num, "ts": ts, "rel": rel, "pct": pct, "share_bar": share_bar, "bar": bar,
           "jsonish": lambda v: json.dumps(v, ensure_ascii=False)}
