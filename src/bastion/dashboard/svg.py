"""Small charts as inline SVG, drawn on the server: no script, no library, no build step.

Only numbers and escaped text go into the markup; labels come from databases and
repositories and are escaped here like everything else."""

from __future__ import annotations

import time
from html import escape
from collections.abc import Sequence

from markupsafe import Markup


def _num(v: float) -> str:
    return f"{v:.1f}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def line(points: Sequence[tuple[float, float | None]], unit: str = "", width: int = 480, height: int = 120,
         label: str = "") -> Markup:
    """A line over time. Gaps (None: the value could not be read) break the line."""
    pad_l, pad_b, pad_t = 48, 18, 8
    w, h = width - pad_l - 6, height - pad_b - pad_t
    vals = [v for _, v in points if v is not None]
    title = f"<title>{escape(label)}</title>" if label else ""
    if len(points) < 2 or not vals:
        return Markup(f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
                      f'height="{height}">{title}<text x="{width // 2}" y="{height // 2}" text-anchor="middle" '
                      f'class="muted">not enough samples yet</text></svg>')
    t0, t1 = points[0][0], points[-1][0]
    top = max(vals) or 1.0
    span = (t1 - t0) or 1.0

    def xy(t: float, v: float) -> str:
        return f"{_num(pad_l + (t - t0) / span * w)},{_num(pad_t + h - v / top * h)}"
    paths: list[list[str]] = []
    cur: list[str] = []
    for t, v in points:
        if v is None:
            if cur:
                paths.append(cur)
            cur = []
        else:
            cur.append(xy(t, v))
    if cur:
        paths.append(cur)
    lines = "".join(f'<polyline fill="none" class="line" points="{" ".join(p)}"/>' for p in paths if len(p) > 1)
    dots = "".join(f'<circle class="dot" r="2" cx="{p[0].split(",")[0]}" cy="{p[0].split(",")[1]}"/>'
                   for p in paths if len(p) == 1)
    last = vals[-1]
    axis = (f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>'
            f'<line class="axis" x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}"/>'
            f'<text class="tick" x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{escape(_fmt(top, unit))}</text>'
            f'<text class="tick" x="{pad_l - 4}" y="{pad_t + h}" text-anchor="end">0</text>'
            f'<text class="tick" x="{pad_l}" y="{height - 4}">{escape(_clock(t0))}</text>'
            f'<text class="tick" x="{pad_l + w}" y="{height - 4}" text-anchor="end">{escape(_clock(t1))} '
            f'(now {escape(_fmt(last, unit))})</text>')
    return Markup(f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
                  f'{title}{axis}{lines}{dots}</svg>')


def bars(items: Sequence[tuple[str, float, float]], width: int = 480, height: int = 140, label: str = "") -> Markup:
    """Backup sizes over time: one bar per backup (its whole size), the part it added in front."""
    pad_l, pad_b, pad_t = 56, 18, 8
    w, h = width - pad_l - 6, height - pad_b - pad_t
    title = f"<title>{escape(label)}</title>" if label else ""
    if not items:
        return Markup(f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
                      f'height="{height}">{title}<text x="{width // 2}" y="{height // 2}" text-anchor="middle" '
                      f'class="muted">no backups yet</text></svg>')
    top = max(max(a, b) for _, a, b in items) or 1.0
    step = w / len(items)
    bw = max(1.0, min(28.0, step * 0.7))
    out = []
    for i, (name, total, added) in enumerate(items):
        x = pad_l + i * step + (step - bw) / 2
        th, ah = total / top * h, added / top * h
        out.append(f'<rect class="bar" x="{_num(x)}" y="{_num(pad_t + h - th)}" width="{_num(bw)}" '
                   f'height="{_num(th)}"><title>{escape(name)}: {escape(human_bytes(total))} '
                   f'({escape(human_bytes(added))} new)</title></rect>')
        out.append(f'<rect class="bar-added" x="{_num(x)}" y="{_num(pad_t + h - ah)}" width="{_num(bw)}" '
                   f'height="{_num(ah)}"/>')
    axis = (f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>'
            f'<text class="tick" x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{escape(human_bytes(top))}</text>'
            f'<text class="tick" x="{pad_l - 4}" y="{pad_t + h}" text-anchor="end">0</text>'
            f'<text class="tick" x="{pad_l}" y="{height - 4}">oldest</text>'
            f'<text class="tick" x="{pad_l + w}" y="{height - 4}" text-anchor="end">newest</text>')
    return Markup(f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
                  f'{title}{axis}{"".join(out)}</svg>')


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"
    return f"{v:.0f}{(' ' + unit) if unit else ''}"


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + "Z"
