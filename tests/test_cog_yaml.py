"""cog.yaml is complete and consistent for `cog build` on a CUDA machine (checked without the cog CLI)."""

import json
import re

import yaml

from conftest import ROOT

CONFIG = yaml.safe_load((ROOT / "cog.yaml").read_text())
TOP_LEVEL = {"build", "image", "predict", "train", "concurrency", "environment", "weights", "tests"}
BUILD = {"gpu", "cuda", "cudnn", "python_version", "python_requirements", "python_packages", "system_packages",
         "run", "pre_install", "sdk_version"}


def pins(path):
    """{name: version} of a requirements file's exact pins (environment markers set aside)."""
    return dict(line.split(";")[0].strip().split("==") for line in (ROOT / path).read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def test_keys_and_types():
    assert set(CONFIG) <= TOP_LEVEL and set(CONFIG["build"]) <= BUILD
    build = CONFIG["build"]
    assert build["gpu"] is True
    assert re.fullmatch(r"3\.\d+(\.\d+)?", build["python_version"])
    assert re.fullmatch(r"\d+\.\d+", build["cuda"])
    assert all(isinstance(c, str) or set(c) <= {"command", "mounts"} for c in build.get("run", []))
    assert all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", e) for e in CONFIG.get("environment", []))


def test_predict_reference_resolves_to_the_predictor_class():
    from cog._inspector import create_predictor

    module_file, cls = CONFIG["predict"].split(":")
    assert (ROOT / module_file).is_file()
    info = create_predictor(module_file.removesuffix(".py"), cls)
    assert "prompt" in info.inputs


def test_gpu_stack_is_pinned_and_consistent():
    gpu = pins(CONFIG["build"]["python_requirements"])
    assert gpu["exllamav2"] == "0.3.2" and re.fullmatch(r"\d+\.\d+\.\d+", gpu["torch"])
    # torch 2.6.0 on PyPI is the CUDA 12.4 build: the image's CUDA must match it for the JIT compile
    assert (gpu["torch"], CONFIG["build"]["cuda"]) in {("2.6.0", "12.4")}
    cpu = pins("requirements.txt")
    for shared in ("transformers", "tokenizers", "sentencepiece", "safetensors", "llguidance", "starlette", "uvicorn",
                   "uvloop", "httptools", "aiohttp", "prometheus_client"):
        assert gpu[shared] == cpu[shared], shared


def test_extension_is_compiled_at_build_time_where_setup_looks():
    from llama_pkg.backends.exllamav2 import EXTENSIONS_DIR

    commands = " ".join(c if isinstance(c, str) else c["command"] for c in CONFIG["build"]["run"])
    assert "import exllamav2.ext" in commands and f"TORCH_EXTENSIONS_DIR={EXTENSIONS_DIR}" in commands
    assert f"TORCH_EXTENSIONS_DIR={EXTENSIONS_DIR}" in CONFIG["environment"]


def test_concurrency_matches_the_gpu_backend():
    from llama_pkg import backends

    assert CONFIG["concurrency"]["max"] == backends.concurrency("exllamav2")


def test_the_docs_list_every_environment_variable_with_its_default():
    from llama_pkg.settings import CUDA_DEFAULTS, VARIABLES

    readme = (ROOT / "docs" / "configuration.md").read_text()
    for name, (default, _) in VARIABLES.items():
        cuda = f"`{CUDA_DEFAULTS[name]}`" if name in CUDA_DEFAULTS else "same"
        assert f"| `{name}` | {f'`{default}`' if default else '(unset)'} | {cuda} |" in readme, name


def test_dockerignore_keeps_the_build_context_to_what_the_image_serves():
    """`cog build` sends the folder to Docker minus .dockerignore: never the venv (GBs), git, caches,
    the demo model (an image must not serve another model than Llama 2) or the tests; always the code."""
    import fnmatch

    patterns = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # no exceptions to reason about

    def ignored(path):
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(prefix, p) or fnmatch.fnmatch(prefix, p.removeprefix("**/"))
                   for p in patterns for prefix in prefixes)

    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", ".cog/openapi_schema.json",
                 "weights/smollm2-135m-instruct/model.safetensors", "tests/test_http.py",
                 "llama_pkg/__pycache__/engine.cpython-311.pyc", ".pytest_cache/v/cache/nodeids", "bench-out/x.json"):
        assert ignored(path), path
    for path in ("predict.py", "cog.yaml", "requirements-gpu.txt", "llama_pkg/engine.py", "llama_pkg/backends/model.py",
                 "weights/llama-2-7b-chat/model.safetensors", "weights/README.md", "scripts/download_weights.py"):
        assert not ignored(path), path


def test_the_cog_sdk_and_coglet_pins_are_the_versions_tested_here():
    """cog.yaml pins the SDK the tests run; coglet, which cog.yaml cannot pin (cog 0.23.1 takes any below
    1.0), is the one cog_stream is written for, and the README's build command pins that one."""
    from importlib.metadata import version

    from llama_pkg.cog_stream import TESTED_COGLET

    assert CONFIG["build"]["sdk_version"] == version("cog") == pins("requirements.txt")["cog"]
    assert TESTED_COGLET == version("coglet") == pins("requirements.txt")["coglet"]
    assert f"export COGLET_WHEEL=pypi:{TESTED_COGLET}" in (ROOT / "README.md").read_text()


def test_setup_warns_when_another_coglet_serves(monkeypatch):
    import concurrent.futures

    from conftest import package_log
    from llama_pkg import cog_stream

    cancel = concurrent.futures.Future.cancel
    try:
        with package_log() as lines:
            cog_stream.install()
            assert not lines  # the tested coglet: nothing to say
            monkeypatch.setattr(cog_stream.metadata, "version", lambda name: "0.24.0")
            cog_stream.install()
        assert lines == [f"coglet 0.24.0 serves, this package is tested with coglet {cog_stream.TESTED_COGLET}: live "
                         "streaming, cancel and the prediction-folder cleanup rely on its internals (build with "
                         f"COGLET_WHEEL=pypi:{cog_stream.TESTED_COGLET})"]
    finally:
        concurrent.futures.Future.cancel = cancel


def test_make_refuses_an_old_python_in_one_line_and_leaves_no_venv(tmp_path):
    """`make PYTHON=python3.10 demo` names the version before anything is made (a stand-in interpreter
    that says it is 3.10)."""
    import shutil
    import subprocess

    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then case "$2" in *print*) echo 3.10; exit 0;; esac; fi\nexit 1\n')
    old.chmod(0o755)
    out = subprocess.run(["make", f"PYTHON={old}", ".venv/.installed"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert f"error: {old} is Python 3.10; 3.11 or newer is needed" in out.stderr
    assert not (tmp_path / ".venv").exists()


def test_the_cpu_dockerfile_matches_what_the_tests_ran():
    """The Dockerfile (scripts/check_image.sh builds and runs it; no Docker engine in `make test`): Python
    3.11 as cog.yaml, torch at requirements.txt's pin, the package's dependencies under requirements.txt's
    pins, a non-root user, every address inside the container, Cog's setup contract, no weights but
    those asked for."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "ARG BASE=python:3.11-slim" in lines and CONFIG["build"]["python_version"] == "3.11"
    assert f"ARG TORCH=torch=={pins('requirements.txt')['torch']}" in lines
    assert "RUN /opt/venv/bin/pip install --quiet --constraint requirements.txt ." in lines
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM ")][-1]:].count("USER cog") == 1
    cmd = json.loads(next(line for line in lines if line.startswith("CMD "))[4:])
    assert cmd[:4] == ["python3", "-m", "llama_pkg", "serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--on-setup-failure") + 1] == "stay"
    assert "ARG WEIGHTS=README.md" in lines and [line for line in lines if line.startswith("COPY") and "weights/" in line] == [
        "COPY weights/ /weights/", "COPY --from=weights /weights/${WEIGHTS} weights/${WEIGHTS}"]
