"""The tools in scripts/: each one a user runs answers --help with its usage, from any folder, and writes
nothing (a script that read its first argument as an output folder made one named `--help`)."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_every_script_answers_help_and_writes_nothing(tmp_path):
    assert len(SCRIPTS) >= 10  # the glob found the tools

    def run(script):
        return subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(SCRIPTS, pool.map(run, SCRIPTS)))
    failed = {p.name: (r.returncode, r.stderr[-300:]) for p, r in done.items()
              if r.returncode != 0 or not r.stdout.startswith("usage:")}
    assert not failed
    assert not list(tmp_path.iterdir())


def test_make_test_model_runs_from_any_folder(tmp_path):
    """Its tokenizer files are found beside tests/model_builders.py, not under the working directory."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_model.py"), "tiny"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "tiny").iterdir()}
