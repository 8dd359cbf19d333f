"""Two workflow runs, the same records: compare the run records of two results folders.

Every random draw of the suite takes its seed from the run's spec, so two runs of the workflow
(two fresh processes per job, or two machines of the same kind) must write the same records,
apart from what is measured on the clock or the machine: times, dates, throughput, latency (and
the serving simulator's predictions made from this run's latency tables), memory readings (peaks;
the exact byte counts of parameters, gradients, optimizer state and saved activations are
compared) and the hardware block. ``lamda-repro compare-records A B`` prints one line per
difference; the workflow tests run the whole smoke workflow twice and require none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# Keys whose values are readings of the clock or of the machine (matched against each key name).
VOLATILE_KEY = re.compile(
    r"time|_at$|_s$|per_s|^peak|latency|speedup|hardware|hostname|tokens_per|throughput_ratio"
    # the serving benchmark: throughput measured in this run, and what the simulator predicts
    # from the latency tables measured in this run (and its error against the measurement)
    r"|^measured|^simulated|vs_vanilla|prediction_error"
)


def comparable(value: Any) -> Any:
    """``value`` without its volatile keys (recursively)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if not VOLATILE_KEY.search(str(k))}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two comparable values first differ (a JSON path), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key} ({'missing in A' if key not in a else 'missing in B'})"
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return None  # NaN in both
    if a != b or type(a) is not type(b):
        return f"{path} ({a!r} vs {b!r})"
    return None


def compare_record_trees(a: Path, b: Path) -> tuple[int, list[str]]:
    """(records compared, one line per difference) between the ``*.json`` records under two
    folders (paths relative to each)."""
    a, b = Path(a), Path(b)
    names_a = {p.relative_to(a) for p in a.rglob("*.json")}
    names_b = {p.relative_to(b) for p in b.rglob("*.json")}
    problems = [f"{n}: only in {a}" for n in sorted(names_a - names_b)]
    problems += [f"{n}: only in {b}" for n in sorted(names_b - names_a)]
    both = sorted(names_a & names_b)
    for name in both:
        try:
            ra, rb = (json.loads((root / name).read_text()) for root in (a, b))
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: unreadable ({exc})")
            continue
        where = first_difference(comparable(ra), comparable(rb))
        if where:
            problems.append(f"{name}: differs at {where}")
    return len(both), problems
