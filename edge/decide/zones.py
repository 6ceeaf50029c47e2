"""Geometry in normalised frame coordinates (0..1, x right, y down): boxes, zones, lines."""

from __future__ import annotations

from typing import Sequence

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # x1, y1, x2, y2


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def anchor(box: Box, where: str) -> Point:
    """The point of a box that stands for its object: its centre, or the middle of its
    bottom edge (where a person's feet touch the floor, which is what a floor zone means)."""
    x = (box[0] + box[2]) / 2
    return (x, box[3]) if where == "bottom" else (x, (box[1] + box[3]) / 2)


def inside(point: Point, polygon: Sequence[Point]) -> bool:
    """Even-odd rule; a point on an edge may fall either way."""
    x, y = point
    hit = False
    j = len(polygon) - 1
    for i in range(len(polygon)):
        xi, yi = polygon[i]
        xj, yj = polygon[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            hit = not hit
        j = i
    return hit


def side(point: Point, start: Point, end: Point) -> int:
    """+1 on side "a" of the line start→end, -1 on side "b", 0 on it.

    Side "a" is to the left of someone walking from start to end as the frame is shown
    (y pointing down), i.e. where the cross product is negative.
    """
    cross = (end[0] - start[0]) * (point[1] - start[1]) - (end[1] - start[1]) * (point[0] - start[0])
    return -1 if cross > 0 else 1 if cross < 0 else 0


def within_segment(point: Point, start: Point, end: Point, margin: float = 0.0) -> bool:
    """Whether ``point`` projects onto the segment (not its extension), with a margin."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length2 = dx * dx + dy * dy
    if length2 == 0:
        return False
    t = ((point[0] - start[0]) * dx + (point[1] - start[1]) * dy) / length2
    return -margin <= t <= 1 + margin
