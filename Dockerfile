# The CPU image: what `cog build` makes of cog.yaml with `gpu: false` (Python 3.11, the pinned packages
# with torch's CPU build, Cog's SDK and server at the tested versions, the package and its schema), served
# by `llama-pkg serve` so that SIGTERM drains for LLAMA_PKG_STOP_GRACE_S, then cancels. The GPU image is
# `cog build` from cog.yaml. No weights go in unless asked (WEIGHTS below); mount them or give COG_WEIGHTS.
#   docker build -t llama-2-7b-chat-cpu .
#   docker run -d -p 127.0.0.1:5000:5000 -v "$PWD/weights/llama-2-7b-chat:/weights/llama-2-7b-chat:ro" \
#     -e COG_WEIGHTS=/weights/llama-2-7b-chat llama-2-7b-chat-cpu
# scripts/check_image.sh builds it on a local Debian base and checks it end to end.

# python:3.11-slim for users; scripts/check_image.sh gives a Debian bookworm base made with debootstrap
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# torch's CPU build: PyTorch's CPU index, or a wheel file put in docker/wheels/ (TORCH=/src/docker/wheels/...)
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# a CA bundle for pip behind a TLS-inspecting proxy (a file in docker/wheels/), else the base's own
ARG PIP_CERT=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_CERT=${PIP_CERT}
WORKDIR /src
COPY docker/wheels/ docker/wheels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --index-url "${TORCH_INDEX}" "${TORCH}"
COPY requirements.txt pyproject.toml README.md ./
COPY llama_pkg/ llama_pkg/
# the package's own dependencies (not the tests'), at the versions requirements.txt pins
RUN /opt/venv/bin/pip install --quiet --constraint requirements.txt .
# the CPU engine's kernel (llama_pkg/model/cpu_kernels.cpp), compiled here: the served image has no compiler
RUN apt-get update -q && apt-get install -y -q --no-install-recommends g++ >/dev/null \
 && LLAMA_PKG_KERNEL_CACHE=/opt/llama-pkg-kernels /opt/venv/bin/python -c \
    "import torch; from llama_pkg.model import cpu_kernels; print(cpu_kernels.build())"

FROM ${BASE} AS weights
COPY weights/ /weights/

FROM ${BASE}
# a weights folder of the build context to bake in (docker build --build-arg WEIGHTS=llama-2-7b-chat)
ARG WEIGHTS=README.md
ENV PATH=/opt/venv/bin:$PATH LANG=C.UTF-8 PYTHONUNBUFFERED=1 HOME=/home/cog \
    LLAMA_PKG_KERNEL_CACHE=/opt/llama-pkg-kernels LLAMA_PKG_CPU_KERNELS=on
RUN useradd --create-home --uid 1000 cog
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/llama-pkg-kernels /opt/llama-pkg-kernels
WORKDIR /src
COPY predict.py cog.yaml ./
COPY llama_pkg/ llama_pkg/
COPY scripts/download_weights.py scripts/
COPY --from=weights /weights/${WEIGHTS} weights/${WEIGHTS}
# what the server writes: its schema (.cog/), downloaded weights (weights/.downloads), coglet's /tmp
RUN mkdir -p .cog weights/.downloads && chown -R cog:cog .cog weights
USER cog
EXPOSE 5000
STOPSIGNAL SIGTERM
# inside a container the server listens on every address; the setup's error stays readable on the
# health check (Cog's contract) instead of ending the container
CMD ["python3", "-m", "llama_pkg", "serve", "--host", "0.0.0.0", "--port", "5000", "--on-setup-failure", "stay"]
