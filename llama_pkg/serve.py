"""`python -m llama_pkg serve`: Cog's own HTTP server (coglet) on predict.py, with the schema it needs."""

import os
import socket
import sys

from . import backends, schema, weights


def slots(folder):
    """Cog's slots: as many as the backend the worker will load runs at once (1 where setup will fail,
    which it then reports)."""
    try:
        info = weights.inspect(weights.resolve(folder))
        return backends.concurrency(backends.choose(info)[0], cuda=backends.on_cuda(info))
    except (weights.WeightsError, ValueError, OSError):
        return 1


def port_taken(host, port):
    """Why a server cannot listen on host:port (an OSError's text), or None. Bound as a server binds
    (SO_REUSEADDR): a port whose last connections linger in TIME_WAIT, a server just stopped, is free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen()
        except OSError as e:
            return e.strerror
    return None


def serve(weights_folder=None, host="127.0.0.1", port=5000, predictor="predict.py:Predictor", openai_port=None,
          model_name=None):
    """Exec Cog's server on the project in the working directory (its predict.py, as Cog's /src);
    `predictor` may name a subclass of predict.Predictor (same inputs, same schema). openai_port: start the
    OpenAI-compatible front there first, as a child that ends with the server."""
    if not os.path.isfile("predict.py"):
        raise SystemExit(f"error: no predict.py in {os.getcwd()}: run `serve` from the project's folder")
    taken = port_taken(host, port)  # coglet's own message for a taken port is a traceback
    if taken:
        raise SystemExit(f"error: cannot serve on {host}:{port} ({taken}): choose another port with --port "
                         "(make serve PORT=...)")
    sys.path.insert(0, os.getcwd())  # predict.py is imported to write its schema, as Cog does from /src
    path = schema.write()
    print(f"wrote {path}", file=sys.stderr)
    env = dict(os.environ, COG_PREDICT_TYPE_STUB=predictor, PORT=str(port))
    # coglet starts its worker with the `python` found on PATH: make it this interpreter (a venv's too)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    if weights_folder:
        env["COG_WEIGHTS"] = str(weights_folder)
    env.setdefault("COG_MAX_CONCURRENCY", str(slots(weights_folder)))
    print(f"{env['COG_MAX_CONCURRENCY']} concurrent predictions (COG_MAX_CONCURRENCY)", file=sys.stderr)
    if openai_port:
        import subprocess

        chosen = str(weights_folder or os.environ.get("COG_WEIGHTS") or "")
        local = chosen and "://" not in chosen
        name = model_name or (os.path.basename(os.path.normpath(chosen)) if local else "llama-2-7b-chat")
        subprocess.Popen([sys.executable, "-m", "llama_pkg", "openai", "--upstream", f"http://{host}:{port}",
                          "--host", host, "--port", str(openai_port), "--model-name", name, "--parent",
                          str(os.getpid())])
        print(f"OpenAI-compatible API on http://{host}:{openai_port}/v1 (model {name!r})", file=sys.stderr)
    os.execve(sys.executable, [sys.executable, "-m", "cog.server.http", "--host", host], env)
