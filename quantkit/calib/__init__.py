"""Calibration: data windows, per-site observers, range selectors, the artifact, imatrix export, plots.

``data`` samples token windows; ``observers`` gathers per-site (and per-expert) statistics during
the layer-by-layer pipeline; ``histogram`` and ``ranges`` pick clipping ranges; ``artifact`` reads
and writes the calibration directory; ``imatrix`` exports llama.cpp importance matrices; ``run``
is ``quantkit calibrate``.
"""

from quantkit.calib.histogram import AbsHistogram
from quantkit.calib.ranges import RANGE_SELECTORS, RangeSelector

__all__ = ["RANGE_SELECTORS", "AbsHistogram", "RangeSelector"]
