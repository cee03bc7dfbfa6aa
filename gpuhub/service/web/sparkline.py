"""A utilisation sparkline as inline SVG: no JavaScript, no image file, numbers only.

Pure. The SVG is built from numbers alone (no text from users), so the pages can embed it as
markup; its accessible name says what it shows in words.
"""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def sparkline_svg(
    values: Sequence[float | None],
    *,
    width: int = 120,
    height: int = 24,
    top: float = 100.0,
    label: str = "GPU utilisation",
) -> str:
    """An SVG polyline of `values` (0..`top`, oldest first; None: no reading, a gap).

    The accessible name gives the mean and the latest reading.
    """
    n = len(values)
    known = [v for v in values if v is not None]
    if known:
        mean = sum(known) / len(known)
        latest = next(v for v in reversed(values) if v is not None)
        summary = f"{label}: mean {mean:.0f} %, latest {latest:.0f} %"
    else:
        summary = f"{label}: no readings"
    step = width / max(n - 1, 1)
    segments: list[list[str]] = []
    current: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            if current:
                segments.append(current)
            current = []
            continue
        clamped = min(max(float(v), 0.0), top)
        y = height - 1 - (clamped / top) * (height - 2)
        current.append(f"{_fmt(i * step)},{_fmt(y)}")
    if current:
        segments.append(current)
    shapes = []
    for points in segments:
        if len(points) == 1:
            x, y = points[0].split(",")
            shapes.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="currentColor"/>')
        else:
            shapes.append(
                f'<polyline points="{" ".join(points)}" fill="none" stroke="currentColor" '
                'stroke-width="1.5" stroke-linejoin="round"/>'
            )
    baseline = (
        f'<line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}" '
        'stroke="currentColor" stroke-opacity="0.25"/>'
    )
    title = summary.replace("&", "&amp;").replace("<", "&lt;")
    return (
        f'<svg class="gpuhub-sparkline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{title}">'
        f"<title>{title}</title>{baseline}{''.join(shapes)}</svg>"
    )
