"""Calibration: data windows, per-site observers, the artifact, imatrix export, plots.

``data`` samples token windows; ``observers`` gathers per-site (and per-expert) statistics during
the layer-by-layer pipeline (ranges are picked by :mod:`quantkit.ranges`); ``artifact`` reads and
writes the calibration directory; ``imatrix`` exports llama.cpp importance matrices; ``run`` is
``quantkit calibrate``.
"""
