"""The fairness report's figures, drawn with matplotlib as inline SVG.

matplotlib is imported on first use (importing :mod:`server` never loads it), and only its
object-oriented API is used (``Figure``, no pyplot): no GUI backend, no global figure state,
safe inside a running coordinator. Text stays text in the SVG (``svg.fonttype = none``) with
matplotlib's own XML escaping, and math parsing is off, so a site name such as ``$x$`` or
``<b>`` is drawn literally. Ids are salted deterministically and the date is left out: the
same run gives the same page.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

__all__ = ["Curve", "curves_svg", "roc_svg", "reliability_svg"]

Curve = tuple[str, Sequence[Sequence[float]]]
"""A labelled line: its legend text and its ``[x, y, ...]`` points."""

_RC: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "fedrad-report",
    "text.parse_math": False,
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
_SIZE = (4.8, 3.9)
Legend = Literal["lower right", "upper left", "best"]


@contextmanager
def _figure(title: str) -> Iterator[tuple[Figure, Axes]]:
    import matplotlib as mpl
    from matplotlib.figure import Figure

    with mpl.rc_context(_RC):
        figure = Figure(figsize=_SIZE, layout="constrained")
        axes = figure.add_subplot()
        axes.set_title(title, fontsize=10, loc="left")
        yield figure, axes


def _colours(count: int) -> list[tuple[float, float, float, float]]:
    import matplotlib as mpl

    cmap = mpl.colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _svg(figure: Figure, axes: Axes, *, legend: Legend) -> str:
    """The figure as an ``<svg>`` element (no XML prolog, doctype or RDF metadata)."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc=legend, fontsize=7, frameon=False)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)  # RDF, no use here
    return text[text.index("<svg") :]


def _unit_square(
    title: str,
    curves: Sequence[Curve],
    *,
    xlabel: str,
    ylabel: str,
    legend: Legend,
    **style: Any,
) -> str:
    """Curves of several subgroups on [0, 1] x [0, 1], with the diagonal for reference."""
    with _figure(title) as (figure, axes):
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
        for (label, points), colour in zip(curves, _colours(len(curves)), strict=True):
            axes.plot(
                [p[0] for p in points], [p[1] for p in points], label=label, color=colour, **style
            )
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel)
        axes.set_aspect("equal")
        return _svg(figure, axes, legend=legend)


def roc_svg(title: str, curves: Sequence[Curve]) -> str:
    """ROC curves (``[FPR, TPR]`` points) of several subgroups in one plot."""
    return _unit_square(
        title,
        curves,
        xlabel="false positive rate",
        ylabel="sensitivity",
        legend="lower right",
        linewidth=1.6,
    )


def reliability_svg(title: str, curves: Sequence[Curve]) -> str:
    """Reliability curves (``[mean score, observed rate, count]`` points) of subgroups."""
    return _unit_square(
        title,
        curves,
        xlabel="mean predicted score",
        ylabel="observed rate",
        legend="upper left",
        linewidth=1.2,
        marker="o",
        markersize=3.5,
    )


def curves_svg(
    title: str,
    curves: Sequence[Curve],
    *,
    ylabel: str,
    xlabel: str = "round",
    reference: Curve | None = None,
) -> str:
    """Values over rounds, one line per site; ``reference`` (e.g. pooled) drawn dashed black."""
    with _figure(title) as (figure, axes):
        for (label, points), colour in zip(curves, _colours(len(curves)), strict=True):
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=label,
                color=colour,
                marker="o",
                markersize=3,
                linewidth=1.4,
            )
        if reference is not None:
            label, points = reference
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=label,
                color="black",
                linestyle="--",
                linewidth=1.4,
            )
        axes.set(xlabel=xlabel, ylabel=ylabel)
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        return _svg(figure, axes, legend="best")
