"""`python -m llama_pkg serve`: Cog's own HTTP server (coglet) on predict.py, with the schema it needs, and
how it stops (a bounded drain, then a cancel) and fails (a failed setup exits, unless asked to stay)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from . import backends, schema, settings, weights


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
          model_name=None, on_setup_failure="exit"):
    """Run Cog's server on the project in the working directory (its predict.py, as Cog's /src) until it
    is stopped; `predictor` may name a subclass of predict.Predictor (same inputs, same schema).
    openai_port: the OpenAI-compatible front there too, ended with the server. on_setup_failure: "exit"
    (exit 1 with the setup's error) or "stay" (Cog's contract: up, its health check saying SETUP_FAILED)."""
    if not os.path.isfile("predict.py"):
        raise SystemExit(f"error: no predict.py in {os.getcwd()}: run `serve` from the project's folder")
    taken = port_taken(host, port)  # coglet's own message for a taken port is a traceback
    if taken:
        raise SystemExit(f"error: cannot serve on {host}:{port} ({taken}): choose another port with --port "
                         "(make serve PORT=...)")
    grace = settings.integer("LLAMA_PKG_STOP_GRACE_S", low=0)
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
    with tempfile.TemporaryDirectory(prefix="llama-pkg-") as control:
        env["LLAMA_PKG_STOP_FIFO"] = fifo = os.path.join(control, "stop")
        os.mkfifo(fifo, 0o600)
        server = Server(env, host, port, fifo, grace, on_setup_failure)
        if openai_port:
            chosen = str(weights_folder or os.environ.get("COG_WEIGHTS") or "")
            local = chosen and "://" not in chosen
            name = model_name or (os.path.basename(os.path.normpath(chosen)) if local else "llama-2-7b-chat")
            server.front = subprocess.Popen([sys.executable, "-m", "llama_pkg", "openai", "--upstream",
                                             f"http://{host}:{port}", "--host", host, "--port", str(openai_port),
                                             "--model-name", name, "--parent", str(os.getpid())])
            print(f"OpenAI-compatible API on http://{host}:{openai_port}/v1 (model {name!r})", file=sys.stderr)
        return server.run()


class Server:
    """Cog's server (coglet) as a child, and how it stops. coglet alone, on SIGTERM, closes its port and
    waits for every running prediction however long it takes; a terminal's Ctrl-C reaching its worker
    breaks the predictions in flight; and coglet stopping while a slot is busy logs "Slot poisoned". So
    coglet runs in a session of its own and this process takes the signals: the first drains (the worker,
    told through its stop pipe, refuses new predictions) for LLAMA_PKG_STOP_GRACE_S, then what still runs
    is cancelled, billed what it streamed; a second signal cancels at once. Once nothing runs, coglet gets
    its SIGTERM. README: "Over HTTP"; docs/serving.md: "Stopping, and a failed setup"."""

    KILL_AFTER_S = 15  # after the cancel: a server still up by then is killed
    SETTLE_S = 0.3  # from the worker's last prediction to coglet's SIGTERM: coglet frees the slot meanwhile
    POLL_S = 0.5  # the health check's period until setup has ended

    def __init__(self, env, host, port, fifo, grace, on_setup_failure):
        self.env, self.fifo, self.grace, self.on_setup_failure = env, fifo, grace, on_setup_failure
        self.idle = os.path.join(os.path.dirname(fifo), "idle")
        self.host, self.url = host, f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.front, self.signals, self.wake = None, 0, threading.Event()

    def run(self):
        coglet = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", self.host], env=self.env,
                                  start_new_session=True, preexec_fn=_die_with_parent)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._signalled)
        ready, handled, cancel_at, idle_at, kill_at, stopped, polled = False, 0, None, None, None, False, 0.0
        while coglet.poll() is None:
            now = time.monotonic()
            if self.signals > handled:
                handled = self.signals
                if handled == 1:
                    self._stop_front()
                    if self._tell_worker("drain"):
                        print(f"stopping: running predictions have {self.grace} s to finish, new ones are refused "
                              "(Ctrl-C again to cancel them now)", file=sys.stderr)
                        cancel_at = now + self.grace
                    else:  # no worker listens (setup not done, or failed): nothing runs
                        coglet.send_signal(signal.SIGTERM)
                        stopped, kill_at = True, now + self.KILL_AFTER_S
                elif cancel_at is not None:
                    cancel_at = min(cancel_at, now)
            if cancel_at is not None and now >= cancel_at and kill_at is None:
                self._tell_worker("cancel")
                print("stopping: the running predictions are cancelled", file=sys.stderr)
                kill_at = now + self.KILL_AFTER_S
            if not stopped and cancel_at is not None and os.path.exists(self.idle):
                idle_at = idle_at or now
                if now >= idle_at + self.SETTLE_S:
                    coglet.send_signal(signal.SIGTERM)
                    stopped, kill_at = True, kill_at or now + self.KILL_AFTER_S
            if kill_at is not None and now >= kill_at:
                print("stopping: the server did not end; killed", file=sys.stderr)
                os.killpg(coglet.pid, signal.SIGKILL)
            if not ready and cancel_at is None and not stopped and now >= polled + self.POLL_S:
                polled = now
                status, error = self._health()
                ready = status in ("READY", "BUSY")
                if status == "SETUP_FAILED" and self.on_setup_failure == "exit":
                    print(f"error: setup failed: {error}", file=sys.stderr)
                    coglet.send_signal(signal.SIGTERM)
                    coglet.wait()
                    self._stop_front()
                    return 1
            self.wake.wait(0.1)
            self.wake.clear()
        self._stop_front()
        return 0 if self.signals else coglet.returncode

    def _signalled(self, signum, frame):
        self.signals += 1
        self.wake.set()

    def _tell_worker(self, word):
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: no worker reads it (none running)
        except OSError:
            return False
        try:
            os.write(fd, word.encode() + b"\n")
        finally:
            os.close(fd)
        return True

    def _health(self):
        try:
            with urllib.request.urlopen(f"{self.url}/health-check", timeout=2) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return None, None
        setup = body.get("setup") or {}
        lines = [line for line in str(setup.get("logs") or "").splitlines() if line.strip()]
        error = str(setup.get("error") or (lines[-1] if lines else "see the server's log"))
        # coglet wraps the predictor's error in its own ("worker setup failed (slot ...): Setup failed: ...")
        return body.get("status"), re.sub(r"^\w*Error: ", "", re.split(r"(?i)setup failed: ", error)[-1])

    def _stop_front(self):
        if self.front is not None and self.front.poll() is None:
            self.front.terminate()


def _die_with_parent():
    """In coglet's process: end with this one, also when it is killed (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
