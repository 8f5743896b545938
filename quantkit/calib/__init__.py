"""Calibration: |x| histograms and the range selectors that pick a clipping value from them."""

from quantkit.calib.histogram import AbsHistogram
from quantkit.calib.ranges import RANGE_SELECTORS, RangeSelector

__all__ = ["RANGE_SELECTORS", "AbsHistogram", "RangeSelector"]
