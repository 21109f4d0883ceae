"""Which model version a run segments with: an alias resolved once, before any slide starts."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from pipelines.services import MissingStoreError, mlflow_client


class ModelNotFoundError(ValueError):
    """A registry alias or version that does not exist."""


def pin_model(uri: str, tracking_uri: str | None) -> str:
    """`models:/<name>@<alias>` as the version it points at now (`models:/<name>/<version>`);
    other URIs and files unchanged. Every slide of a run then uses one version even if the
    alias moves meanwhile, and the version is part of each task's cache key."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    name, _, alias = uri.removeprefix("models:/").partition("@")
    try:
        version = mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version
    except MissingStoreError as exc:
        raise ModelNotFoundError(f"{uri}: no such model version ({exc})") from exc
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: no such model version ({exc.message})") from exc
    return f"models:/{name}/{version}"
