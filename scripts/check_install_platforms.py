"""What `pip install -r requirements.txt` resolves to on Linux x86_64, Linux aarch64 and macOS arm64, asked
of the registry with pip's --dry-run (nothing is installed). pip evaluates environment markers against
the machine it runs on, not the --platform given, so this script evaluates the markers of
requirements.txt for each target itself and dry-runs what applies there. (Markers inside the packages'
own metadata are still evaluated by pip against this machine.) Where the whole set fails, a second
dry-run without torch and what requires it (accelerate) shows whether the rest resolves there, and one
of torch alone with --no-deps whether its wheel exists there.
Prints JSON: per target, ok or the error.

    python scripts/check_install_platforms.py [requirements.txt] [--out FILE]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.requirements import Requirement

TORCH_AND_DEPENDENTS = {"torch", "accelerate"}
TARGETS = {
    "linux-x86_64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
                     ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64",
                      "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_39_x86_64", "linux_x86_64"]),
    "linux-aarch64": ({"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
                      ["manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64",
                       "manylinux_2_31_aarch64", "manylinux_2_34_aarch64", "manylinux_2_39_aarch64", "linux_aarch64"]),
    "macos-arm64": ({"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
                    ["macosx_11_0_arm64", "macosx_12_0_arm64", "macosx_13_0_arm64", "macosx_14_0_arm64",
                     "macosx_10_9_universal2", "macosx_11_0_universal2"]),
}


def for_target(lines, environment):
    """The requirement lines that apply on the target, with their markers evaluated there."""
    kept = []
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**environment, "python_version": "3.11"}):
            req.marker = None
            kept.append(str(req))
    return kept


def dry_run(requirements, platforms, *options):
    """pip's dry-run install of the requirements for the platforms -> (ok, its last two ERROR lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(requirements) + "\n")
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                   "--target", str(Path(tmp) / "t"), "-r", str(reqs), *options]
        for platform in platforms:
            command += ["--platform", platform]
        out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return out.returncode == 0, [line for line in out.stderr.splitlines() if line.startswith("ERROR")][-2:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("requirements", nargs="?", default="requirements.txt")
    ap.add_argument("--out")
    a = ap.parse_args()
    lines = Path(a.requirements).read_text().splitlines()
    result = {"date": time.strftime("%Y-%m-%d"), "requirements": a.requirements, "python": "3.11", "targets": {}}
    for name, (environment, platforms) in TARGETS.items():
        wanted = for_target(lines, environment)
        ok, errors = dry_run(wanted, platforms)
        result["targets"][name] = {"ok": ok, "errors": errors}
        if not ok:
            rest = [r for r in wanted if Requirement(r).name.lower() not in TORCH_AND_DEPENDENTS]
            ok, errors = dry_run(rest, platforms)
            result["targets"][name]["without_torch"] = {"ok": ok, "errors": errors}
            ok, errors = dry_run([r for r in wanted if Requirement(r).name.lower() == "torch"], platforms, "--no-deps")
            result["targets"][name]["torch_wheel_alone"] = {"ok": ok, "errors": errors}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
