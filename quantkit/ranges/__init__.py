"""Range selection: |x| histograms and the selectors (minmax, percentile, MSE, KL) that pick a clipping value.

Pure math on tensors, below the schemes that name a selector and the calibration that feeds it.
"""

from quantkit.ranges.histogram import AbsHistogram
from quantkit.ranges.selectors import RANGE_SELECTORS, RangeSelector

__all__ = ["RANGE_SELECTORS", "AbsHistogram", "RangeSelector"]
