"""A small line plot drawn with QPainter (napari does not ship matplotlib): live loss/agreement, per-slice scores."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

COLORS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8", "#fff176")


class LinePlot(QWidget):
    """Named series of (x, y) points on shared axes; y spans [0, max(1, data)]; NaN points break lines."""

    def __init__(self, title: str, x_label: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title, self.x_label = title, x_label
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(130)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def set_series(self, name: str, points: list[tuple[float, float]]) -> None:
        self.series[name] = list(points)
        self.update()

    def add_point(self, name: str, x: float, y: float) -> None:
        self.series.setdefault(name, []).append((float(x), float(y)))
        self.update()

    def _ranges(self) -> tuple[float, float, float]:
        xs = [x for pts in self.series.values() for x, y in pts if math.isfinite(y)]
        ys = [y for pts in self.series.values() for _, y in pts if math.isfinite(y)]
        x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x1 <= x0:
            x1 = x0 + 1.0
        return x0, x1, max([1.0, *ys])

    def paintEvent(self, event) -> None:  # Qt's method name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().text().color()
        w, h = self.width(), self.height()
        left, right, top, bottom = 34, 8, 32, 18
        box = QRectF(left, top, max(w - left - right, 10), max(h - top - bottom, 10))
        painter.setPen(QPen(text))
        painter.drawText(QRectF(0, 0, w, 16), Qt.AlignmentFlag.AlignCenter, self.title)
        painter.drawRect(box)
        x0, x1, y1 = self._ranges()
        painter.drawText(QRectF(0, box.top() - 6, left - 4, 12), Qt.AlignmentFlag.AlignRight, f"{y1:.2g}")
        painter.drawText(QRectF(0, box.bottom() - 6, left - 4, 12), Qt.AlignmentFlag.AlignRight, "0")
        painter.drawText(
            QRectF(left, box.bottom() + 2, box.width(), bottom - 2),
            Qt.AlignmentFlag.AlignCenter,
            f"{self.x_label} {x0:g}..{x1:g}" if self.series else self.x_label,
        )

        def to_screen(x: float, y: float) -> QPointF:
            return QPointF(
                box.left() + (x - x0) / (x1 - x0) * box.width(), box.bottom() - max(0.0, y) / y1 * box.height()
            )

        legend_x = box.left()
        for i, (name, points) in enumerate(self.series.items()):
            color = QColor(COLORS[i % len(COLORS)])
            painter.setPen(QPen(color, 1.6))
            run: list[QPointF] = []
            for x, y in [*points, (math.nan, math.nan)]:
                if math.isfinite(y):
                    run.append(to_screen(x, y))
                    continue
                if len(run) == 1:
                    painter.drawEllipse(run[0], 2.5, 2.5)
                elif run:
                    painter.drawPolyline(QPolygonF(run))
                run = []
            painter.drawText(QRectF(legend_x, 16, box.right() - legend_x, 14), Qt.AlignmentFlag.AlignLeft, name)
            legend_x += painter.fontMetrics().horizontalAdvance(name) + 14
        painter.end()
