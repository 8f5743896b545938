"""Peak resident memory of a command, sampled from /proc: total RSS, anonymous RSS and file-backed RSS.

Anonymous memory is what a run really needs (file pages of a memory-mapped checkpoint can be dropped
by the kernel under pressure); both are reported.

    python -m tests.memory_probe -- quantkit quantize MODEL --method absmax --out OUT
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _sample(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in FIELDS:
                values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def measure(command: list[str], interval: float = 0.02, **popen: Any) -> dict[str, Any]:
    """Run ``command``; its exit code, seconds and peak VmRSS/RssAnon/RssFile in bytes."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    peaks = dict.fromkeys(FIELDS, 0)
    while process.poll() is None:
        for key, value in _sample(process.pid).items():
            peaks[key] = max(peaks[key], value)
        time.sleep(interval)
    return {"returncode": process.returncode, "seconds": round(time.perf_counter() - started, 2),
            "peak_rss": peaks["VmRSS"], "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"]}


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(measure(args[1:] if args[:1] == ["--"] else args), indent=2))
