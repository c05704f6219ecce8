"""predict.Predictor, the Cog adapter, end to end on the test model; its inputs mirror llama_pkg.params."""

import asyncio
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import predict
from conftest import ROOT
from llama_pkg.params import BOUNDS, DESCRIPTIONS, FIELDS, Request


class Scope:
    def __init__(self):
        self.metrics = {}

    def record_metric(self, name, value):
        self.metrics[name] = value


@pytest.fixture(scope="module")
def predictor(test_model):
    p = predict.Predictor()
    p.setup(weights=test_model)
    return p


def call(predictor, monkeypatch, **inputs):
    """One prediction through the async run, as Cog's worker runs it (the coroutine on an event loop,
    the generator it returns iterated): (chunks, metrics)."""
    scope = Scope()
    monkeypatch.setattr(predict, "current_scope", lambda: scope)
    defaults = {name: param.default.default for name, param in inspect.signature(predictor.run).parameters.items()
                if name != "prompt"}

    return list(asyncio.run(predictor.run(**{**defaults, **inputs}))), scope.metrics


def test_inputs_mirror_params():
    params = inspect.signature(predict.Predictor.run).parameters
    assert tuple(n for n in params if n != "self") == FIELDS
    for name in FIELDS:
        field = params[name].default
        if name in ("prompt", "messages"):  # Cog's None, not given, is the Request's "": one of the two is
            assert field.default is None and field.min_length == 1, name
        else:
            assert field.default == Request.__dataclass_fields__[name].default, name
        if name in BOUNDS:
            assert (field.ge, field.le) == BOUNDS[name][1:3], name
        else:
            assert field.ge is None and field.le is None
        assert field.description == DESCRIPTIONS[name], name


def test_readme_inputs_table_follows_the_declaration():
    """Every input has a row in the README's table with its type, default and bounds (params.py)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Inputs"):readme.index("## Prompt rendering")]
    rows = {name: line for line in table.splitlines() if line.startswith("| ")
            for name in line.split("|")[1].replace(",", " ").split()}

    def number(x):
        return str(int(x)) if float(x).is_integer() else str(x)

    for name in FIELDS:
        cells = [c.strip() for c in rows[name].split("|")[1:-1]]
        kind = BOUNDS[name][0].__name__ if name in BOUNDS else "str"
        assert cells[1] == kind, name
        default = Request.__dataclass_fields__[name].default
        if name == "system_prompt":
            assert cells[2].startswith(f'"{default[:40]}') and "DEFAULT_SYSTEM_PROMPT" in cells[2], name
        elif name in ("prompt", "messages"):
            assert cells[2].startswith("none (give prompt or messages)"), name
        elif default is not None:
            assert cells[2].startswith(repr(default).replace("'", '"') if isinstance(default, str) else number(default)), name
        if name in BOUNDS:
            _, low, high, exclusive = BOUNDS[name]
            bounds = f"({number(low)}, {number(high)}]" if exclusive else f"{number(low)}..{number(high)}"
            assert cells[3].startswith(bounds), name


def test_cog_sdk_reads_the_predictor():
    from cog._inspector import create_predictor

    info = create_predictor("predict", "Predictor")
    assert list(info.inputs) == list(FIELDS)
    assert info.inputs["max_tokens"].default == 512 and info.inputs["max_tokens"].le == 4096
    assert info.inputs["max_new_tokens"].deprecated and info.inputs["min_new_tokens"].deprecated


def test_predict_streams_and_meters(predictor, monkeypatch):
    chunks, metrics = call(predictor, monkeypatch, prompt="Hello!", max_new_tokens=16, seed=3)
    again, _ = call(predictor, monkeypatch, prompt="Hello!", max_new_tokens=16, seed=3)
    assert chunks == again and len(chunks) > 1 and all(isinstance(c, str) for c in chunks)
    assert metrics["output_token_count"] == 16 and metrics["input_token_count"] > 30
    assert not chunks[0].startswith(" ")


def test_bad_input_fails_with_the_field_named(predictor, monkeypatch):
    with pytest.raises(ValueError, match="^temperature: "):
        call(predictor, monkeypatch, prompt="Hi", temperature=float("nan"))


def test_missing_weights_error_names_the_folder(tmp_path):
    p = predict.Predictor()
    with pytest.raises(RuntimeError, match=str(tmp_path / "nothing")) as e:
        p.setup(weights=tmp_path / "nothing")
    assert "download_weights.py" in str(e.value)


@pytest.mark.slow  # a subprocess
def test_cli_streams_and_prints_metrics_last(test_model):
    out = subprocess.run([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(test_model),
                          "-i", "prompt=Hi there", "-i", "max_new_tokens=7", "-i", "seed=1", "-i", "temperature=0.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stderr.strip().splitlines()[-1])
    assert metrics["output_token_count"] == 7 and out.stdout.strip()
    assert "Using seed: 1" in out.stderr


@pytest.mark.slow  # a subprocess
def test_the_installed_command_runs_the_cli(test_model):
    """`pip install -e .` (make) puts the `llama-pkg` command beside the interpreter (pyproject.toml)."""
    command = Path(sys.executable).parent / "llama-pkg"
    assert command.exists(), "llama-pkg is not installed: pip install -e ."
    out = subprocess.run([str(command), "predict", "--weights", str(test_model), "-i", "prompt=Hi", "-i",
                          "max_new_tokens=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1])["output_token_count"] == 3


@pytest.mark.slow  # builds a wheel
def test_a_plain_install_carries_every_package(tmp_path):
    """`pip install .` (not -e) installs what pyproject.toml names: every package folder of llama_pkg. Built
    from a copy, so no earlier build's leftovers (setuptools' build/) can fill the gaps."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "llama_pkg", source / "llama_pkg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("llama_pkg-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {str(f.relative_to(ROOT)) for f in (ROOT / "llama_pkg").rglob("*.py")}
    assert on_disk and on_disk <= in_wheel, sorted(on_disk - in_wheel)


@pytest.mark.slow  # a subprocess
def test_ctrl_c_while_generating_exits_130_with_the_metrics_of_what_was_generated(test_model):
    import signal

    p = subprocess.Popen([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(test_model), "-i",
                          "prompt=Hi", "-i", "max_new_tokens=4000", "-i", "min_new_tokens=4000"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.read(20)  # the answer is streaming
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err
    metrics = json.loads(err.strip().splitlines()[-1])
    assert 0 < metrics["output_token_count"] < 4000 and metrics["input_token_count"] > 0


@pytest.mark.slow  # subprocesses
def test_a_bad_setting_or_a_taken_port_is_one_line_not_a_traceback(test_model):
    import os
    import socket

    out = subprocess.run([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(test_model), "-i", "prompt=Hi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LLAMA_PKG_MAX_BATCH="many"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: LLAMA_PKG_MAX_BATCH='many': must be an integer of at least 1" in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "llama_pkg", "serve", "--weights", str(test_model), "--port",
                              str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"error: cannot serve on 127.0.0.1:{port} (Address already in use)" in out.stderr


@pytest.mark.slow  # a subprocess
def test_cli_rejects_bad_input_before_loading(test_model):
    out = subprocess.run([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(test_model),
                          "-i", "prompt=Hi", "-i", "top_k=many"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.splitlines() == ["error: top_k: must be an integer, got 'many'"]


@pytest.mark.slow  # a subprocess
def test_cli_refuses_an_input_given_twice(test_model):
    out = subprocess.run([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(test_model),
                          "-i", "prompt=first", "-i", "prompt=second"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "prompt: given more than once" in out.stderr and not out.stdout.strip()


@pytest.mark.slow  # a subprocess
def test_cli_names_a_broken_config_in_one_line(test_model, tmp_path):
    folder = shutil.copytree(test_model, tmp_path / "broken")
    (folder / "config.json").write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "llama_pkg", "predict", "--weights", str(folder), "-i", "prompt=Hi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: {folder / 'config.json'} is not valid JSON" in out.stderr


def test_importing_the_package_and_the_adapter_loads_no_torch():
    code = ("import sys; import predict, llama_pkg.pipeline, llama_pkg.runtime, llama_pkg.serve, llama_pkg.schema, "
            "llama_pkg.engine.scheduler, llama_pkg.engine.block_manager, llama_pkg.engine.sequence, llama_pkg.backends.base, "
            "llama_pkg.download, llama_pkg.__main__; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'exllamav2')); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_port_left_in_time_wait_is_free_one_that_listens_is_not():
    """A server just stopped leaves its connections in TIME_WAIT: `serve` takes that port again at once
    (it refused it, "Address already in use", for a minute); a port another server listens on is taken."""
    import socket

    from llama_pkg.serve import port_taken

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert port_taken("127.0.0.1", port) == "Address already in use"
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server closes first: its side of the connection lingers in TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    with socket.socket() as plain:  # without SO_REUSEADDR the port is refused while TIME_WAIT lasts
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert port_taken("127.0.0.1", port) is None


def test_help_lists_every_input_with_its_bounds_and_says_what_each_option_is():
    from llama_pkg.__main__ import inputs_help

    text = inputs_help()
    for name in FIELDS:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name} ("))
        if name in BOUNDS:
            assert f"{BOUNDS[name][1]}..{BOUNDS[name][2]}" in line, line
        assert DESCRIPTIONS[name] in line
    out = subprocess.run([sys.executable, "-m", "llama_pkg", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout.split("options:", 1)[1]
    for option in ("--weights", "--host", "--port", "--on-setup-failure"):
        described = out.split(option, 1)[1].split("\n  -", 1)[0]
        assert len(described.split()) > 3, (option, described)
