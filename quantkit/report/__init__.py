"""Reports: what was done to every tensor, with sizes, errors, timings and versions."""
