"""Draws the main panels of the cotune Grafana dashboard as one SVG, from a live Prometheus.

The picture of the README (docs/dashboard.svg) comes from here: each panel's queries of
deploy/helm/cotune/files/cotune-dashboard.json are run over a time range through Prometheus'
HTTP API (/api/v1/query_range) and drawn as hand-written SVG polylines, in Grafana's dark
colours. No Grafana and no plotting library: the standard library only.

    python deploy/grafana/render_panels.py --prometheus http://127.0.0.1:9090 \
        --last 10m --out docs/dashboard.svg

The dashboard's variables take every value ($job, $tenant, $adapter: .*), and
$__rate_interval is --rate-interval (default 1m).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/helm/cotune/files/cotune-dashboard.json"
MAIN_PANELS = [
    "Requests by status", "Time to first token", "Tokens/s: prompt vs generated",
    "Step composition: tokens/s by kind", "KV cache usage", "Adapter loads and evictions",
    "Job loss: train and eval", "SLO attainment by kind",
]
COLUMNS, PANEL_W, PANEL_H, GAP = 4, 300, 210, 10
PLOT = dict(left=46, right=10, top=28, bottom=52)  # margins of the plot inside a panel
COLOURS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
           "#705da0", "#37872d", "#fade2a"]
BACKGROUND, PANEL, GRID, TEXT, DIM = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e8e"
PER_SECOND = {"reqps": " (req/s)", "ops": " (per second)"}  # units the axis labels leave out
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def substitute(expr: str, rate_interval: str) -> str:
    values = {"__rate_interval": rate_interval}
    return _VARIABLE.sub(lambda m: values.get(m[1] or m[2], ".*"), expr)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list:
    """[(labels, [(t, value or nan), ...]), ...] of a range query."""
    url = f"{prometheus.rstrip('/')}/api/v1/query_range?" + urllib.parse.urlencode(
        dict(query=expr, start=start, end=end, step=step))
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]])
            for r in body["data"]["result"]]


def legend(template: str, labels: dict) -> str:
    return _LEGEND.sub(lambda m: labels.get(m[1], ""), template) or "value"


def panel_series(panel: dict, prometheus: str, start: float, end: float, step: float,
                 rate_interval: str) -> list[tuple[str, list]]:
    series = []
    for target in panel["targets"]:
        expr = substitute(target["expr"], rate_interval)
        for labels, points in query_range(prometheus, expr, start, end, step):
            series.append((legend(target.get("legendFormat", ""), labels), points))
    return series


def nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at least `value`."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


def fmt(value: float, unit: str) -> str:
    """An axis label: short, as Grafana writes it (the unit of rates is in the title)."""
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "s":
        return f"{value * 1000:.3g}ms" if 0 < value < 1 else f"{value:.3g}s"
    if value >= 1000:
        return f"{value / 1000:.3g}k"
    return f"{value:.3g}"


def draw_panel(panel: dict, series: list, x0: float, y0: float, start: float,
               end: float) -> list[str]:
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    fixed_max = panel["fieldConfig"]["defaults"].get("max")
    values = [v for _, points in series for _, v in points if math.isfinite(v)]
    top = fixed_max if fixed_max is not None else nice_max(max(values, default=0))
    left, right = x0 + PLOT["left"], x0 + PANEL_W - PLOT["right"]
    upper, lower = y0 + PLOT["top"], y0 + PANEL_H - PLOT["bottom"]
    out = [f'<g class="panel" data-title="{escape(panel["title"])}">',
           f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" rx="3" '
           f'fill="{PANEL}" stroke="{GRID}"/>',
           f'<text x="{x0 + 8}" y="{y0 + 17}" fill="{TEXT}" font-size="12" '
           f'font-weight="600">{escape(panel["title"] + PER_SECOND.get(unit, ""))}</text>']
    for i in range(3):  # grid lines and y labels at 0, half, top (nice numbers all three)
        value = top * i / 2
        y = lower - (lower - upper) * i / 2
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                   f'stroke="{GRID}" stroke-width="1"/>')
        out.append(f'<text x="{left - 4}" y="{y + 3:.1f}" fill="{DIM}" font-size="9" '
                   f'text-anchor="end">{escape(fmt(value, unit))}</text>')
    for t, anchor, xx in ((start, "start", left), (end, "end", right)):
        out.append(f'<text x="{xx}" y="{lower + 12}" fill="{DIM}" font-size="9" '
                   f'text-anchor="{anchor}">{datetime.fromtimestamp(t):%H:%M:%S}</text>')

    def point(t: float, v: float) -> tuple[float, float]:
        x = left + (right - left) * (t - start) / max(end - start, 1e-9)
        y = lower - (lower - upper) * min(max(v / top, 0.0), 1.0)
        return x, y

    for index, (_, points) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        segment: list[tuple[float, float]] = []
        for t, v in [*points, (end, math.nan)]:  # NaN (no data) breaks the line
            if math.isfinite(v):
                segment.append(point(t, v))
                continue
            if len(segment) == 1:
                x, y = segment[0]
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.5" fill="{colour}"/>')
            elif segment:
                coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
                out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                           f'stroke-width="1.5" stroke-linejoin="round"/>')
            segment = []
    for index, (name, _) in enumerate(series[:6]):  # legend: two columns, three lines
        lx = x0 + 10 + (index % 2) * (PANEL_W - 20) / 2
        ly = lower + 24 + (index // 2) * 11
        colour = COLOURS[index % len(COLOURS)]
        out.append(f'<rect x="{lx}" y="{ly - 6}" width="8" height="3" fill="{colour}"/>')
        out.append(f'<text x="{lx + 12}" y="{ly - 2}" fill="{TEXT}" font-size="9">'
                   f'{escape(name[:26])}</text>')
    if not series:
        out.append(f'<text x="{(left + right) / 2}" y="{(upper + lower) / 2}" fill="{DIM}" '
                   f'font-size="11" text-anchor="middle">No data</text>')
    out.append("</g>")
    return out


def render(prometheus: str, start: float, end: float, step: float | None = None,
           rate_interval: str = "1m", titles: list[str] = MAIN_PANELS,
           dashboard: Path = DASHBOARD) -> str:
    """The SVG of the panels named `titles`, over [start, end] (unix seconds)."""
    board = json.loads(Path(dashboard).read_text())
    flat = []  # rows hold their panels only while collapsed
    for panel in board["panels"]:
        flat.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    by_title = {panel["title"]: panel for panel in flat}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise KeyError(f"panels {missing} are not in {dashboard}")
    step = step or max((end - start) / 240, 1.0)
    rows = math.ceil(len(titles) / COLUMNS)
    width = COLUMNS * PANEL_W + (COLUMNS + 1) * GAP
    height = rows * PANEL_H + (rows + 1) * GAP + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Inter, Helvetica, Arial, sans-serif">',
           f'<rect width="{width}" height="{height}" fill="{BACKGROUND}"/>',
           f'<text x="{GAP}" y="18" fill="{TEXT}" font-size="14" font-weight="600">'
           f'Grafana dashboard "{escape(board["title"])}", main panels, '
           f'{datetime.fromtimestamp(start):%Y-%m-%d %H:%M:%S} to '
           f'{datetime.fromtimestamp(end):%H:%M:%S}</text>']
    for index, title in enumerate(titles):
        panel = by_title[title]
        x0 = GAP + (index % COLUMNS) * (PANEL_W + GAP)
        y0 = 24 + GAP + (index // COLUMNS) * (PANEL_H + GAP)
        series = panel_series(panel, prometheus, start, end, step, rate_interval)
        out.extend(draw_panel(panel, series, x0, y0, start, end))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh])", text)
    if not match:
        raise argparse.ArgumentTypeError(f"a duration such as 90s, 10m or 1h, not {text!r}")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument("--start", type=float, help="unix seconds (default: end - --last)")
    parser.add_argument("--end", type=float, help="unix seconds (default: now)")
    parser.add_argument("--last", type=_duration, default=600.0, help="range [10m]")
    parser.add_argument("--step", type=float, help="seconds between points [range / 240]")
    parser.add_argument("--rate-interval", default="1m", help="$__rate_interval [1m]")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/dashboard.svg")
    args = parser.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - args.last
    svg = render(args.prometheus, start, end, args.step, args.rate_interval,
                 dashboard=args.dashboard)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg)
    print(f"wrote {args.out} ({len(MAIN_PANELS)} panels, {start:.0f} to {end:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
