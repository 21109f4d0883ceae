"""Load a trained U-Net for inference from the MLflow registry, a run, or a model file,
never executing code stored with the model.

Registry and run URIs load only segflow's own format: a `pytorch` flavour saved as a
torch.export ("pt2") archive, with the U-Net configuration in the MLmodel metadata. The decision
is made from the MLmodel file (YAML, read with yaml.safe_load) and the model's file listing
before anything else is downloaded; any other model (a pickle-serialized PyTorch model, a
cloudpickled python_function, another flavour) is refused. The weights are then read from the
archive's raw tensor records (pipelines.pt2_weights), not with torch.export.load, which
unpickles parts of the archive. Files go through `segcore.checkpoint.load_unet`
(weights_only=True). Whatever the source, the returned `UNet` is in eval mode and takes raw
pixel values, uint8 cast to float (0..255), channels first, as `segcore.tiling.predict_tiled`
passes them: training folded its normalisation into the first convolution
(segcore.normalization).

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

from pipelines.pt2_weights import Pt2ArchiveError, pt2_state_dict
from pipelines.runtime import default_tracking_uri
from pipelines.services import MissingStoreError, mlflow_client
from segcore.checkpoint import CheckpointError, load_unet
from segcore.model import UNet, UNetConfig
from segcore.normalization import Normalization, fold_normalization

#: What mlflow.pytorch writes in the model's data folder: a torch.export archive ("pt2"), or a
#: torch.save pickle of the whole module ("pickle").
PT2_FILE = "model.pt2"
PICKLED_TORCH_FILE = "model.pth"
MLMODEL_FILE = "MLmodel"

#: The version `models:/<name>/latest` means: the highest.
LATEST = "latest"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:", "s3://", "gs://", "http://", "https://")


class ModelLoadError(ValueError):
    """A model URI or file that does not hold a segflow U-Net."""


class ModelNotFoundError(ModelLoadError):
    """A registry model, alias or version that does not exist (or a store with none)."""


def pin_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(URI of the version a `models:/` URI means now, that version); other URIs unchanged,
    with version None. Pinned once, the weights a run loads and the version it records cannot
    disagree when the alias moves meanwhile. `tracking_uri` None: the default workdir's store
    (pipelines.runtime.default_tracking_uri).

        pin_model_uri("models:/segflow-unet@champion", uri)  # ("models:/segflow-unet/3", "3")
        pin_model_uri("models:/segflow-unet/latest", uri)    # the highest version
        pin_model_uri("models:/segflow-unet/2", uri)         # ("models:/segflow-unet/2", "2")
        pin_model_uri("runs:/<run id>/model", uri)           # unchanged, None
    """
    if not uri.startswith("models:/"):
        return uri, None
    name, sep, alias = uri.removeprefix("models:/").partition("@")
    if not sep:
        name, _, version = name.partition("/")
        if version != LATEST:
            return uri, version or None
    try:
        client = mlflow_client(tracking_uri or default_tracking_uri())
        if sep:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelNotFoundError(f"{uri}: no such model version (no versions of {name})")
            version = max(versions, key=lambda v: int(v.version)).version
    except MissingStoreError as exc:
        raise ModelNotFoundError(f"{uri}: no such model version ({exc})") from exc
    except MlflowException as exc:
        raise ModelNotFoundError(f"{uri}: no such model version ({exc.message})") from exc
    return f"models:/{name}/{version}", str(version)


def _artifact_uri(uri: str, tracking_uri: str, client: MlflowClient) -> str:
    """Where the model at a `models:/` or `runs:/` URI is stored, resolved with `client`.

    MLflow resolves these URIs with the process-wide default registry (download_artifacts
    ignores its registry_uri argument for `models:/`, and `runs:/` URIs of MLflow 3 logged
    models go through a `models:/<model id>` lookup without it), so a fresh process with an
    explicit tracking URI would look in the wrong store: resolve them here, with the client.
    """
    if uri.startswith("models:/"):
        pinned, version = pin_model_uri(uri, tracking_uri)
        name = pinned.removeprefix("models:/").rpartition("/")[0]
        return client.get_model_version_download_uri(name, version)
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        run = client.get_run(run_id)
        name, _, rest = path.partition("/")
        logged = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'"
        )
        for model in logged:
            if model.source_run_id == run_id:  # a logged model (MLflow 3)
                return f"{model.artifact_location.rstrip('/')}/{rest}".rstrip("/")
        return f"{run.info.artifact_uri.rstrip('/')}/{path}"  # a model in the run's artifacts
    return uri


def _refusal(mlmodel: Model, data_files: set[str]) -> str | None:
    """Why segflow will not load this model, or None for its own format (pytorch flavour,
    torch.export archive). Decided from the MLmodel file and the data folder's file names."""
    flavours = mlmodel.flavors
    if "pytorch" in flavours:
        if PICKLED_TORCH_FILE in data_files:
            return f"pickle-serialized model (pytorch flavour, {PICKLED_TORCH_FILE} via torch.save)"
        if PT2_FILE in data_files:
            return None
        return f"not a torch.export model (no {PT2_FILE} in its pytorch flavour's data)"
    pickled = sorted(name for name, conf in flavours.items() if _is_pickled(conf))
    if pickled:
        return f"pickle-serialized model ({', '.join(pickled)} flavour stored with pickle)"
    return f"not a PyTorch model (flavours: {', '.join(sorted(flavours)) or 'none'})"


def _is_pickled(flavour: object) -> bool:
    """Whether a flavour's MLmodel entry names pickle as its storage (cloudpickle_version,
    pickle_module_name, python_model: x.pkl, serialization_format: cloudpickle, ...).

    Flavours spell it in different keys and values, so the whole entry is searched; a false
    positive only changes the wording, as every flavour but pytorch's pt2 is refused anyway."""
    return "pickle" in str(flavour).lower() or ".pkl" in str(flavour).lower()


def _download(artifact_uri: str, dst: str, tracking_uri: str | None) -> Path:
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=artifact_uri, dst_path=dst, tracking_uri=tracking_uri
    )
    return Path(local)


def _file_names(data_uri: str, mlmodel: Model, tracking_uri: str | None) -> set[str]:
    """Names of the files in a pytorch flavour's data folder (none for other flavours)."""
    if "pytorch" not in mlmodel.flavors:
        return set()
    listing = mlflow.artifacts.list_artifacts(artifact_uri=data_uri, tracking_uri=tracking_uri)
    return {Path(item.path).name for item in listing}


def _from_mlflow(uri: str, tracking_uri: str) -> UNet:
    client = mlflow_client(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = _artifact_uri(uri, tracking_uri, client).rstrip("/")
            mlmodel = Model.load(_download(f"{base}/{MLMODEL_FILE}", tmp, tracking_uri))
            data = f"{base}/{mlmodel.flavors.get('pytorch', {}).get('model_data', 'data')}"
            refusal = _refusal(mlmodel, _file_names(data, mlmodel, tracking_uri))
            if refusal is not None:
                raise ModelLoadError(f"{uri}: refused: {refusal}")
            metadata = mlmodel.metadata or {}
            if "unet_config" not in metadata:
                raise ModelLoadError(f"{uri}: not a segflow U-Net (no unet_config in its metadata)")
            state = pt2_state_dict(_download(f"{data}/{PT2_FILE}", tmp, tracking_uri))
        except (MlflowException, OSError) as exc:
            raise ModelLoadError(f"{uri}: cannot load model ({exc})") from exc
        except Pt2ArchiveError as exc:
            raise ModelLoadError(f"{uri}: refused: {exc}") from exc
    try:
        model = UNet.from_config(UNetConfig(**metadata["unet_config"]))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{uri}: invalid unet_config in its metadata ({exc})") from exc
    try:
        model.load_state_dict(state)
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

    `tracking_uri` (default: the default workdir's store, pipelines.runtime) locates registry
    and run URIs; it also serves as the registry URI.
    """
    text = str(uri_or_path)
    if text.startswith(URI_SCHEMES):
        model = _from_mlflow(text, tracking_uri or default_tracking_uri())
    else:
        try:
            model = _from_file(Path(text))
        except CheckpointError as exc:
            raise ModelLoadError(str(exc)) from exc
    return model.to(device).eval()
