"""Merge what scripts/gpu_check.sh wrote under OUT into one JSON, OUT/gpu-check.json: the card, date and
versions, the GPU tests' counts from their JUnit files (graphs off and on), the step profiles and the
benchmark. Prints the summary.

    python scripts/gpu_check_report.py OUT
"""

import argparse
import json
import platform
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path):
    """{passed, failed, skipped} of a pytest --junitxml file; None when the run left none."""
    if not path.exists():
        return None
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def versions():
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "exllamav2"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a fact to report
            out[name] = f"unavailable: {e}"
    try:
        import torch

        out["cuda"], out["device"] = torch.version.cuda, torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001
        out["device"] = f"unavailable: {e}"
    return out


def main(out):
    out = Path(out)

    def read(name):
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    launches = {}
    for which in ("before", "after"):  # counted on the CPU (scripts/count_launches.py): the latest committed
        found = sorted(Path("benchmarks").glob(f"*-launches-per-step-{which}.json"))
        launches[f"launches_per_step_{which}"] = json.loads(found[-1].read_text())["launches_per_step"] if found else None
    report = {"date": time.strftime("%Y-%m-%d"), **versions(),
              "gpu_tests": {"graphs_off": junit_counts(out / "tests-graphs-off.xml"),
                            "graphs_on": junit_counts(out / "tests-graphs-on.xml")},
              **launches, "profile": read("profile.json"), "bench": read("bench-cuda-engine.json")}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2))
    bench = report["bench"] or {}
    print(json.dumps({"device": report.get("device"), "gpu_tests": report["gpu_tests"],
                      **launches, **{k: bench.get(k) for k in ("engine_stream_tok_s", "bare_generator_tok_s",
                                                               "paired_ratio_median", "intertoken_p99_over_median",
                                                               "ttft_128_ms_median", "setup_s")}}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the folder scripts/gpu_check.sh wrote")
    main(ap.parse_args().out)
