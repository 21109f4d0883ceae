"""Load a trained U-Net for inference from the MLflow registry, a run, or a model file.

Every path avoids unpickling code: registry and run URIs go through MLflow's own loader (the
models are saved in its "pt2" torch.export format, which it checks is pickle-free), files
through `segcore.checkpoint.load_unet` (weights_only=True). Whatever the source, the returned
`UNet` is in eval mode and takes raw pixel values, uint8 cast to float (0..255), channels
first, as `segcore.tiling.predict_tiled` passes them: training folded its normalisation into
the first convolution (pipelines.training.normalization).

    load_model("models:/segflow-unet@champion")      # alias
    load_model("models:/segflow-unet/3")             # version
    load_model("runs:/<run id>/model")               # a run's logged model
    load_model("work/checkpoints/<run id>/model.pt") # weights-only file
    load_model("work/checkpoints/<run id>/last.ckpt")  # Lightning checkpoint
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from pipelines.training.config import Normalization
from pipelines.training.normalization import fold_normalization
from segcore.checkpoint import CheckpointError, load_unet
from segcore.model import UNet, UNetConfig

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:", "s3://", "gs://", "http://", "https://")


class ModelLoadError(ValueError):
    """A model URI or file that does not hold a segflow U-Net."""


def _artifact_uri(uri: str, client: MlflowClient) -> str:
    """`models:/name@alias` or `models:/name/version` resolved against `client`'s registry.

    MLflow's download_artifacts resolves `models:/` URIs with the process-wide default registry
    and ignores its registry_uri argument, so a fresh process with an explicit tracking URI
    would look in the wrong store: resolve the version here, with the given client.
    """
    if not uri.startswith("models:/"):
        return uri
    name, sep, alias = uri.removeprefix("models:/").partition("@")
    if sep:
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = name.partition("/")
    return client.get_model_version_download_uri(name, version)


def _from_mlflow(uri: str, tracking_uri: str | None) -> UNet:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=_artifact_uri(uri, client), dst_path=tmp, tracking_uri=tracking_uri
            )
            graph = mlflow.pytorch.load_model(local)
            metadata = Model.load(local).metadata or {}
        except (MlflowException, OSError) as exc:
            raise ModelLoadError(f"{uri}: cannot load model ({exc})") from exc
    if "unet_config" not in metadata:
        raise ModelLoadError(f"{uri}: not a segflow U-Net (no unet_config in its metadata)")
    model = UNet.from_config(UNetConfig(**metadata["unet_config"]))
    try:
        model.load_state_dict(graph.state_dict())
    except RuntimeError as exc:
        raise ModelLoadError(f"{uri}: weights do not match its U-Net configuration") from exc
    return model


def _from_file(path: Path) -> UNet:
    model = load_unet(path)
    # A Lightning checkpoint holds the training-time weights, which expect normalised input;
    # files written by training (save_unet) are already folded.
    payload = torch.load(path, map_location="cpu", weights_only=True)
    normalization = payload.get("hyper_parameters", {}).get("normalization")
    if normalization is not None:
        model = fold_normalization(model, Normalization(**normalization))
    return model


def load_model(
    uri_or_path: str | Path, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> UNet:
    """The U-Net at `uri_or_path` on `device`, in eval mode, taking raw 0..255 pixel values.

    `tracking_uri` (default: MLflow's own, e.g. MLFLOW_TRACKING_URI) locates registry and run
    URIs; it also serves as the registry URI.
    """
    text = str(uri_or_path)
    if text.startswith(URI_SCHEMES):
        model = _from_mlflow(text, tracking_uri)
    else:
        try:
            model = _from_file(Path(text))
        except CheckpointError as exc:
            raise ModelLoadError(str(exc)) from exc
    return model.to(device).eval()
