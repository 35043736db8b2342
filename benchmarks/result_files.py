"""Where a benchmark's results live, and a results file read back to be added to."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def default_out(benchmark: str, cuda: bool) -> Path:
    """benchmarks/results/<benchmark>-<cuda|cpu>.json"""
    return ROOT / "benchmarks" / "results" / f"{benchmark}-{'cuda' if cuda else 'cpu'}.json"


def load_or_new(out: Path, benchmark: str, device_type: str, **fields: Any) -> dict[str, Any]:
    """The results in `out` (measured on `device_type`, else an error), or a new result with
    no rows and `fields`: a rerun adds rows to what an earlier command wrote."""
    if out.exists():
        result = json.loads(out.read_text())
        if result.get("device_type") != device_type:
            raise SystemExit(f"{out} holds {result.get('device_type')} results, not "
                             f"{device_type}: pass another --out")
        return result
    return {"benchmark": benchmark, "device_type": device_type, "rows": [], **fields}
