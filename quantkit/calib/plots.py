"""PNG plots of a calibration histogram with the clipping value each range selector chose.

matplotlib is imported only when a plot is drawn, so ``import quantkit`` never loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.ranges.histogram import AbsHistogram


def plot_ranges(hist: AbsHistogram, ranges: dict[str, float], title: str, path: Path) -> Path:
    """Write ``path``: the |x| histogram (log-scale counts) with one labelled vertical line per selector.

    ``ranges`` maps a selector name to its amax; each line is labelled ``"<name> <amax>"``
    (e.g. ``kl 3.214``). The PNG is written to a temporary file beside ``path`` and renamed
    into place, so ``path`` is either the old file or the complete new one.
    """
    if not hist.num_bins:
        raise QuantkitError(f"{hist.name}: cannot plot an empty histogram (no non-zero value observed)")
    # deferred: matplotlib is slow to import and only plots need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.stairs(hist.counts.cpu().numpy(), hist.edges.cpu().numpy(), color="0.3", label="|x| histogram")
    ax.set_yscale("log", nonpositive="clip")
    ax.set_ylim(bottom=0.5)  # empty bins sit on the floor, a single count stays visible
    for i, (name, amax) in enumerate(ranges.items()):
        ax.axvline(amax, color=f"C{i}", linestyle="--", linewidth=1.2, label=f"{name} {amax:.4g}")
    ax.set_xlabel("|x|")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        with tmp.open("wb") as fh:
            canvas.print_png(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
