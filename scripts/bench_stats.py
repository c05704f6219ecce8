"""The statistics every benchmark script reports (imported by them: scripts/ is on sys.path when one runs).

A figure is the median of its rounds with the interquartile range; a ratio is the median of paired
per-round ratios, never a ratio of two medians or two maxima from different rounds.
"""

import json
import statistics
from pathlib import Path


def quartiles(values, digits=4):
    """{"median", "q1", "q3", "iqr"} of the values."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else list(values) * 3
    return {"median": round(median, digits), "q1": round(q1, digits), "q3": round(q3, digits),
            "iqr": round(q3 - q1, digits)}


def paired(numerators, denominators, digits=3):
    """quartiles() of the per-round ratios numerators[i] / denominators[i]."""
    return quartiles([a / b for a, b in zip(numerators, denominators)], digits)


def percentile(values, q):
    """The value at fraction q (0..1) of the sorted values (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def report(results, out=None):
    """Print the results as JSON, and write them to `out` when given (the raw file beside RESULTS.md)."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
