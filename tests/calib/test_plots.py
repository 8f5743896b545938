"""Histogram plots: a real PNG written atomically, one-line error when empty, matplotlib loaded lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.calib.plots import plot_ranges
from quantkit.errors import QuantkitError
from quantkit.ranges.histogram import AbsHistogram
from quantkit.ranges.selectors import RANGE_SELECTORS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def laplace_histogram() -> AbsHistogram:
    hist = AbsHistogram(name="layers.0.mlp.input")
    uniform = torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * (1 - 2e-6) + 1e-6
    hist.observe(torch.distributions.Laplace(0.0, 1.0).icdf(uniform))
    return hist


def test_writes_a_png_with_every_selector(tmp_path: Path) -> None:
    hist = laplace_histogram()
    ranges = {name: RANGE_SELECTORS.get(name)(hist) for name in RANGE_SELECTORS}
    path = plot_ranges(hist, ranges, "layers.0.mlp input", tmp_path / "plots" / "mlp.png")
    assert path == tmp_path / "plots" / "mlp.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000  # a rendered 800x450 figure, not an empty image
    assert [p.name for p in path.parent.iterdir()] == ["mlp.png"]  # no temporary file left behind


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "mlp.png"
    path.write_bytes(b"old")
    plot_ranges(laplace_histogram(), {"kl": 3.214}, "mlp", path)
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("batch", [None, torch.zeros(16)])
def test_empty_histogram_is_a_one_line_error(batch: torch.Tensor | None, tmp_path: Path) -> None:
    hist = AbsHistogram(name="layers.3.attn.input")
    if batch is not None:
        hist.observe(batch)  # zeros only: the range, and so the bins, are still unknown
    with pytest.raises(QuantkitError, match=r"^layers\.3\.attn\.input: cannot plot an empty histogram") as err:
        plot_ranges(hist, {"minmax": 0.0}, "attn", tmp_path / "attn.png")
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_matplotlib_is_imported_only_when_plotting(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import torch\n"
        "import quantkit, quantkit.calib.plots\n"
        "from quantkit.ranges.histogram import AbsHistogram\n"
        "assert 'matplotlib' not in sys.modules, 'imported too early'\n"
        "hist = AbsHistogram()\n"
        "hist.observe(torch.randn(1000))\n"
        f"quantkit.calib.plots.plot_ranges(hist, {{'minmax': hist.absmax}}, 't', Path({str(tmp_path / 'a.png')!r}))\n"
        "assert 'matplotlib' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
