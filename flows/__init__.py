"""Orchestration: Prefect flows over the stages (flows.pipeline), their deployments
(flows.deployments) and the `segflow` command line (flows.cli).

`from flows import pipeline_flow` works; the flows load on first use, so `segflow --help` does
not pay for importing Prefect, torch and MLflow.
"""

from __future__ import annotations

FLOWS = ("ingest_flow", "weights_flow", "train_flow", "infer_flow", "pipeline_flow")


def __getattr__(name: str):
    if name in FLOWS:
        from flows import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
