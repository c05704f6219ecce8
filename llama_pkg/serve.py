"""`python -m llama_pkg serve`: Cog's own HTTP server (coglet) on predict.py, with the schema it needs."""

import os
import sys

from . import schema
from .weights import ROOT


def serve(weights=None, host="127.0.0.1", port=5000, predictor="predict.py:Predictor"):
    """Exec Cog's server; `predictor` may name a subclass of predict.Predictor (same inputs, same schema)."""
    sys.path.insert(0, str(ROOT))
    path = schema.write()
    print(f"wrote {path}", file=sys.stderr)
    env = dict(os.environ, COG_PREDICT_TYPE_STUB=predictor, PORT=str(port))
    # coglet starts its worker with the `python` found on PATH: make it this interpreter (a venv's too)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if weights:
        env["COG_WEIGHTS"] = str(weights)
    os.chdir(ROOT)
    os.execve(sys.executable, [sys.executable, "-m", "cog.server.http", "--host", host], env)
