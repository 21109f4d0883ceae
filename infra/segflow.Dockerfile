# segflow itself: the image of the Dask scheduler and workers and the Prefect worker.
# Build from the repository root, one image per torch build:
#
#   docker build -f infra/segflow.Dockerfile -t segflow:cpu .                             # CPU
#   docker build -f infra/segflow.Dockerfile --build-arg TORCH_VARIANT=cu130 -t segflow:cu130 .
#
# TORCH_VARIANT names one of PyTorch's own indexes (https://download.pytorch.org/whl/<variant>:
# cpu, cu126, cu128, cu130, ...); its torch wheel carries the CUDA runtime as pip packages, so the
# host needs only the NVIDIA driver and container toolkit. The version is requirements.lock's
# (torch==2.13.0 matches 2.13.0+cpu and 2.13.0+cu130 alike), and the second install keeps it.
# tests/test_images.py checks these pins against the lock and resolves the installs on PyPI.
FROM python:3.11.14-slim-bookworm
ARG TORCH_VARIANT=cpu
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/segflow
COPY requirements.lock ./
# torch alone from its index (--no-deps: its dependencies come from PyPI with the lock's pins).
RUN pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/${TORCH_VARIANT} \
    -c requirements.lock torch
COPY pyproject.toml README.md prefect.yaml ./
COPY segcore segcore
COPY pipelines pipelines
COPY flows flows
RUN pip install --no-cache-dir -c requirements.lock .
