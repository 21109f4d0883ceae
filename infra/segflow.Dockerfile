# segflow itself: the image of the Dask scheduler and workers and the Prefect worker.
# Build from the repository root: docker build -f infra/segflow.Dockerfile -t segflow .
# GPU hosts: install the CUDA build of torch 2.13.0 before segflow (see README).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/segflow
COPY pyproject.toml requirements.lock README.md ./
COPY segcore segcore
COPY pipelines pipelines
COPY flows flows
COPY prefect.yaml prefect.yaml
RUN pip install --no-cache-dir -c requirements.lock .
