"""The label-bootstrap stage (pipelines.bootstrap) on real ingested stores: valid NGFF labels
with full pyramids, block-wise clusters equal to the whole slide's, annotations the weights
stage accepts, the stage contract (a rerun skips, a changed setting redoes), a labelled store
refused alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from flow_helpers import prefect_api
from ome_zarr_models.v05 import Image
from scipy import ndimage

from flows.cli import main
from pipelines.bootstrap import BootstrapConfig, bootstrap_archive, slide_scale, train_bootstrap
from pipelines.cluster import ClusterConfig, dask_client
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.services import mlflow_client
from pipelines.sources import SlideSource
from pipelines.weightmaps import WeightsConfig, compute_weight_maps
from segcore.bootstrap import ClusteringConfig, predict_clusters
from segcore.clustering_input import clustering_input
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide
from segcore.tissue import TissueConfig

THREADS = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
#: 128 x 192 px in 64 px chunks: 3 levels.
INGEST = IngestConfig(chunk_size=64, min_level_size=32, tissue=TissueConfig(max_size=96))
#: Seconds of CPU: a small network, few tiles; blocks and network tiles smaller than the slide
#: so that both seams are crossed.
CONFIG = BootstrapConfig(
    clustering=ClusteringConfig(channels=16, n_clusters=16, max_iterations=30, min_labels=3),
    tile_size=64,
    n_tiles=4,
    block_size=64,
    predict_tile=48,
    cluster=THREADS,
)


@pytest.fixture(scope="module")
def client():
    with dask_client(THREADS) as c:
        yield c


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, client) -> dict[str, Path]:
    """An unlabelled store and a labelled one of the same synthetic slide."""
    folder = tmp_path_factory.mktemp("bootstrap")
    slide = write_synthetic_slide(
        folder / "s.tif", folder / "s_labels.tif", 128, 192, seed=5, tile=64
    )
    plain = ingest_slide(SlideSource(image=slide.image_path), folder / "plain", INGEST, client)
    labelled = ingest_slide(
        SlideSource(image=slide.image_path, labels=slide.labels_path),
        folder / "labelled",
        INGEST,
        client,
    )
    return {"plain": plain.store, "labelled": labelled.store}


def test_bootstrap_writes_valid_labels_equal_to_the_whole_slide(ingested, client, tmp_path):
    store = Path(shutil.copytree(ingested["plain"], tmp_path / "s.zarr"))
    (result,) = bootstrap_archive([store], CONFIG, client=client)
    assert result.status == "written", result.error
    image = Image.from_zarr(zarr.open_group(store, mode="r"))
    assert set(image.labels.label_paths) == {"tissue", "annotations", "bootstrap"}
    slide = SlideStore.open(store)
    for name in ("bootstrap", "annotations"):
        group = zarr.open_group(store / "labels" / name, mode="r")
        datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
        assert len(datasets) == slide.n_levels
        for k in range(1, slide.n_levels):  # every level filled from the one above
            np.testing.assert_array_equal(group[str(k)][...], group[str(k - 1)][::2, ::2])
    # The same seed trains the same network; the whole slide at once equals the blocks.
    scale = slide_scale(slide)
    trained = train_bootstrap([slide], {slide.path: scale}, CONFIG)
    run, nucleus, rule = trained.run, trained.nucleus, trained.rule
    assert result.nucleus == nucleus and rule == result.rule == "haematoxylin above Otsu"
    clusters = zarr.open_array(store / "labels" / "bootstrap" / "0", mode="r")[...]
    whole = predict_clusters(run.network, clustering_input(slide.image(0)[...], scale), 10_000)
    np.testing.assert_array_equal(clusters, whole)
    instances = slide.annotations[...]
    nuclei = np.isin(clusters, nucleus)
    np.testing.assert_array_equal(instances > 0, nuclei)
    assert result.n_instances == ndimage.label(nuclei)[1] == len(np.unique(instances)) - 1
    assert 0 < result.foreground_fraction < 0.6
    # The weight-map stage takes the bootstrapped annotations as it takes real ones.
    assert compute_weight_maps(store, WeightsConfig(block_size=64), client).status == "written"


def test_a_rerun_skips_and_a_changed_setting_redoes(ingested, client, tmp_path):
    store = Path(shutil.copytree(ingested["plain"], tmp_path / "s.zarr"))
    labelled = Path(shutil.copytree(ingested["labelled"], tmp_path / "l.zarr"))
    first, refused = bootstrap_archive([store, labelled], CONFIG, client=client)
    assert first.status == "written" and refused.status == "failed"
    assert refused.error.startswith(f"{labelled}: was ingested with a label image")
    (again,) = bootstrap_archive([store], CONFIG, client=client)
    assert again.status == "skipped" and again.identity == first.identity
    assert again.nucleus == first.nucleus and again.n_instances == first.n_instances
    other = (first.nucleus[0] + 1) % 16
    given = BootstrapConfig.model_validate({**CONFIG.model_dump(), "nucleus": str(other)})
    (redone,) = bootstrap_archive([store], given, client=client)
    assert redone.status == "written" and redone.rule == "given"
    assert redone.identity != first.identity
    clusters = zarr.open_array(store / "labels" / "bootstrap" / "0", mode="r")[...]
    annotations = zarr.open_array(store / "labels" / "annotations" / "0", mode="r")[...]
    np.testing.assert_array_equal(annotations > 0, clusters == redone.nucleus[0])


@pytest.mark.slow  # a Prefect server, MLflow's database and three stage commands
def test_segflow_bootstrap_then_weights_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    archive = tmp_path / "archive"
    archive.mkdir()
    write_synthetic_slide(archive / "u.tif", tmp_path / "truth.tif", 128, 128, seed=7, tile=64)
    common = ["--workdir", str(tmp_path / "work")]
    tiny = [
        "tile_size=64",
        "n_tiles=4",
        "clustering.channels=16",
        "clustering.n_clusters=16",
        "clustering.max_iterations=20",
        "block_size=64",
        "cluster.processes=false",
    ]
    store = tmp_path / "work" / "stores" / "u.zarr"
    with prefect_api():
        ingest = ["chunk_size=64", "min_level_size=32", "cluster.processes=false"]
        assert main(["ingest", str(archive), *ingest, *common]) == 0
        capsys.readouterr()
        assert main(["bootstrap", *tiny, *common]) == 0, capsys.readouterr().err
        assert "written" in capsys.readouterr().out
        assert main(["bootstrap", *tiny, *common]) == 0  # answered from Prefect's cache
        assert "cached" in capsys.readouterr().out
        assert main(["weights", "block_size=64", "cluster.processes=false", *common]) == 0
    slide = SlideStore.open(store)
    assert slide.annotations is not None and slide.weight is not None
    # Tracked in the run's MLflow store: the loss curve, one point per iteration.
    run_id = zarr.open_group(store / "labels" / "bootstrap", mode="r").attrs["segflow"][
        "mlflow_run_id"
    ]
    client = mlflow_client(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "loss")
    assert 1 <= len(history) <= 20


def test_nucleus_ids_parse_from_the_command_line_form():
    assert BootstrapConfig(nucleus="7,3").nucleus == (3, 7)
    with pytest.raises(ValueError, match="cluster ids"):
        BootstrapConfig(nucleus="3,x")
    with pytest.raises(ValueError, match=r"nucleus clusters \[120\] do not exist"):
        BootstrapConfig(nucleus="3,120")
