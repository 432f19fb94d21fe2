"""A bare matplotlib Figure for the PNGs that analyze, audit and report write.

matplotlib is imported on first use: the stages must run without it when plots are off.
"""

from __future__ import annotations

import logging

from mpdeploy.core.errors import MpdeployError

logger = logging.getLogger(__name__)


def new_figure(width: float, height: float, **margins: float):
    """A `width` x `height` inch Figure at 100 dpi; `margins` go to subplots_adjust (left=, wspace=, ...)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MpdeployError("plots need matplotlib: pip install matplotlib, or pass --no-plots") from None
    # A bare Figure renders through Agg without touching pyplot's global backend or state.
    fig = Figure(figsize=(width, height), dpi=100)
    # Fixed margins: constrained layout costs ~40% of the render time of these simple plots.
    fig.subplots_adjust(**margins)
    return fig
