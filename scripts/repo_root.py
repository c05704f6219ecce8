"""Imported first by the scripts that use the tests' model builders: puts the repository's root on
sys.path, so `python scripts/NAME.py` runs from the root without PYTHONPATH=. (scripts/ itself is on
sys.path when a script runs)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
