"""segflow export: measurements equal whole-slide regionprops, QuPath GeoJSON streamed whole
and once per object, stable ids, and the command's errors; on real Zarr stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from scipy import ndimage
from skimage.measure import regionprops_table

from flows.cli import main
from pipelines.export import ExportError, export_store, object_id
from pipelines.export.outline import rings, shoelace
from pipelines.export.source import ExportSource
from pipelines.stage import Identity, record_identity
from segcore import ngff
from segcore.store import STORE_FORMAT, StoreError

CHUNK = 32
MPP = 0.25


def random_objects(shape: tuple[int, int], seed: int, n: int = 60) -> np.ndarray:
    """Connected instances: ellipses of many sizes and angles (some merging, some with holes),
    many crossing chunk faces and corners, labelled 1..k."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b, t = rng.uniform(2, 12), rng.uniform(1.5, 6), rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        if a > 9 and b > 4:  # a ring: an object with a hole
            inside &= (u / a) ** 2 + (v / b) ** 2 > 0.2
        mask |= inside
    labels, _ = ndimage.label(mask)
    return labels.astype(np.uint32)


def make_store(
    path: Path,
    instances: np.ndarray,
    seed: int = 0,
    mpp: float | None = MPP,
    chunk: int = CHUNK,
    model_uri: str = "models:/segflow-unet/3",
) -> Path:
    """A slide store (3-channel image, segmentation and instances from inference) written
    with the NGFF helpers, its segmentation carrying an inference identity."""
    rng = np.random.default_rng(seed)
    shape = instances.shape
    image = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
    root = zarr.open_group(path, mode="w")
    ngff.create_image(root, image.shape, "uint8", chunk_size=chunk, min_level_size=10**6)[0][
        ...
    ] = image
    root.attrs["segflow"] = {"store_format": STORE_FORMAT, "mpp": mpp, "tissue_downsample": 1}
    segmentation = ngff.create_label(root, "segmentation", shape, "uint8", 1, chunk_size=chunk)
    segmentation[0][...] = (instances > 0).astype(np.uint8)
    ngff.create_label(root, "instances", shape, "uint32", 1, chunk_size=chunk)[0][...] = instances
    identity = Identity(
        stage="infer", format=1, inputs={"image": "sha256:1"}, settings={"tile": 64}, model="d1"
    )
    record_identity(
        zarr.open_group(path / "labels" / "segmentation", mode="r+"),
        identity,
        {"model_uri": model_uri, "model_version": "3", "model_digest": "d1"},
    )
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    instances = random_objects((150, 170), seed=3)
    path = make_store(tmp_path_factory.mktemp("slide") / "s1.zarr", instances)
    return path, instances


def test_objects_cross_chunk_faces(slide):
    """The fixture is worth its name: many objects span two or more chunks."""
    _, instances = slide
    crossing = 0
    for box in ndimage.find_objects(instances):
        rows, cols = box
        crossing += (rows.start // CHUNK != (rows.stop - 1) // CHUNK) or (
            cols.start // CHUNK != (cols.stop - 1) // CHUNK
        )
    assert crossing >= 15


def test_table_equals_whole_slide_regionprops(slide, tmp_path):
    path, instances = slide
    result = export_store(path, tmp_path, formats=["table"], max_in_flight=3)
    assert result.n_crossing >= 15
    table = pq.read_table(tmp_path / "s1.parquet")
    ours = table.to_pandas().sort_values("id").reset_index(drop=True)
    image = np.asarray(ExportSource.open(path).image[...]).transpose(1, 2, 0)
    ref = regionprops_table(
        instances,
        intensity_image=image,
        properties=("label", "area", "centroid", "bbox", "perimeter", "eccentricity"),
        extra_properties=(),
    )
    means = regionprops_table(instances, intensity_image=image, properties=("intensity_mean",))
    np.testing.assert_array_equal(ours["id"], ref["label"])
    np.testing.assert_array_equal(ours["area_px"], ref["area"])
    np.testing.assert_allclose(ours["centroid_y"], ref["centroid-0"], atol=0.01)
    np.testing.assert_allclose(ours["centroid_x"], ref["centroid-1"], atol=0.01)
    for k, name in enumerate(("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")):
        np.testing.assert_array_equal(ours[name], ref[f"bbox-{k}"])
    np.testing.assert_allclose(ours["perimeter_px"], ref["perimeter"], rtol=1e-12)
    np.testing.assert_allclose(ours["eccentricity"], ref["eccentricity"], atol=1e-9)
    for c in range(3):
        np.testing.assert_allclose(ours[f"mean_intensity_{c}"], means[f"intensity_mean-{c}"])
    np.testing.assert_allclose(ours["area_um2"], ref["area"] * MPP**2)
    np.testing.assert_allclose(ours["perimeter_um"], ref["perimeter"] * MPP)
    provenance = json.loads(table.schema.metadata[b"segflow"])
    assert provenance["model_uri"] == "models:/segflow-unet/3"
    assert provenance["model_digest"] == "d1"
    assert provenance["identity"]["settings"] == {"tile": 64}


def test_geojson_features_whole_once_and_qupath_shaped(slide, tmp_path):
    path, instances = slide
    result = export_store(path, tmp_path, formats=["geojson"], max_in_flight=2)
    collection = json.loads((tmp_path / "s1.geojson").read_text())
    features = collection["features"]
    n = int(instances.max())
    assert result.n_objects == len(features) == n
    labels = sorted(f["properties"]["label_id"] for f in features)
    assert labels == list(range(1, n + 1))  # every instance once
    counts = np.bincount(instances.ravel())
    for feature in features:
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"]["name"] == "Nucleus"
        assert len(properties["classification"]["color"]) == 3
        assert {"area_px", "perimeter_px", "eccentricity"} <= set(properties["measurements"])
        assert feature["geometry"]["type"] == "Polygon"
        outline, *holes = feature["geometry"]["coordinates"]
        assert outline[0] == outline[-1]
        area = shoelace(outline) + sum(shoelace(h) for h in holes)
        # Outlines follow pixel edges: the area is the pixel count, exactly.
        assert area == counts[properties["label_id"]]
    assert any(len(f["geometry"]["coordinates"]) > 1 for f in features)  # holes kept
    assert collection["properties"]["model_uri"] == "models:/segflow-unet/3"


def test_geojson_validates_as_geojson(slide, tmp_path):
    geojson_pydantic = pytest.importorskip("geojson_pydantic")
    path, _ = slide
    export_store(path, tmp_path, formats=["geojson"])
    text = (tmp_path / "s1.geojson").read_text()
    collection = geojson_pydantic.FeatureCollection.model_validate_json(text)
    assert len(collection.features) == len(json.loads(text)["features"])


def test_ids_stable_across_exports_and_tied_to_labels(slide, tmp_path):
    path, _ = slide
    export_store(path, tmp_path / "a", formats=["geojson"], max_in_flight=1)
    export_store(path, tmp_path / "b", formats=["geojson"], max_in_flight=4)

    def ids(folder: Path) -> dict[int, str]:
        features = json.loads((folder / "s1.geojson").read_text())["features"]
        return {f["properties"]["label_id"]: f["id"] for f in features}

    first, second = ids(tmp_path / "a"), ids(tmp_path / "b")
    assert first == second
    assert len(set(first.values())) == len(first)
    namespace = ExportSource.open(path).namespace
    assert all(first[label] == object_id(namespace, label) for label in first)


def test_another_model_gives_other_ids(tmp_path):
    instances = random_objects((40, 40), seed=1, n=5)
    a = make_store(tmp_path / "a" / "s.zarr", instances)
    b = make_store(tmp_path / "b" / "s.zarr", instances)
    zarr.open_group(b / "labels" / "segmentation", mode="r+").attrs["segflow"] = {
        **zarr.open_group(b / "labels" / "segmentation").attrs["segflow"],
        "identity": {"stage": "infer", "format": 1, "inputs": {}, "settings": {}, "model": "d2"},
    }
    assert ExportSource.open(a).namespace != ExportSource.open(b).namespace


def test_without_pixel_size_no_micrometres(tmp_path):
    instances = random_objects((48, 48), seed=5, n=8)
    path = make_store(tmp_path / "s.zarr", instances, mpp=None)
    export_store(path, tmp_path)
    table = pq.read_table(tmp_path / "s.parquet")
    assert "area_um2" not in table.column_names and "perimeter_um" not in table.column_names
    features = json.loads((tmp_path / "s.geojson").read_text())["features"]
    assert "area_um2" not in features[0]["properties"]["measurements"]


def test_empty_slide_writes_empty_files(tmp_path):
    path = make_store(tmp_path / "s.zarr", np.zeros((40, 50), np.uint32))
    result = export_store(path, tmp_path)
    assert result.n_objects == 0
    assert json.loads((tmp_path / "s.geojson").read_text())["features"] == []
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 0


def test_object_filling_its_chunk_and_slide_edges(tmp_path):
    """No background in a chunk, objects on the slide's own edges, one spanning every chunk."""
    instances = np.zeros((70, 70), np.uint32)
    instances[:40, :40] = 1
    instances[60:, 60:] = 2
    instances[45:47, :] = 3
    path = make_store(tmp_path / "s.zarr", instances)
    export_store(path, tmp_path, formats=["table"])
    ours = pq.read_table(tmp_path / "s.parquet").to_pandas().sort_values("id")
    np.testing.assert_array_equal(ours["area_px"], [1600, 100, 140])
    ref = regionprops_table(instances, properties=("perimeter",))
    np.testing.assert_allclose(ours["perimeter_px"], ref["perimeter"])


def test_rings_of_diagonal_pixels_and_holes():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = True  # touching at a corner: one outline
    assert len(rings(mask)) == 1 and shoelace(rings(mask)[0]) == 2
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    areas = sorted(shoelace(r) for r in rings(ring, (10, 20)))
    assert areas == [-1, 9]
    assert rings(np.ones((1, 1), bool), (10, 20)) == [
        [(20, 10), (21, 10), (21, 11), (20, 11), (20, 10)]
    ]


def test_store_from_output_dir_finds_its_image(slide, tmp_path):
    """Inference with output_dir writes labels into <out>/<name>.zarr naming the slide store."""
    path, instances = slide
    out = tmp_path / "out" / "s1.zarr"
    root = zarr.open_group(out, mode="w", attributes={"segflow": {"source": str(path)}})
    ngff.create_array(root, "labels/instances/0", instances.shape, "uint32", (CHUNK, CHUNK))[
        ...
    ] = instances
    result = export_store(out, tmp_path / "exported", formats=["table"])
    assert result.n_objects == int(instances.max())


def test_cli_exports_and_refuses_bad_input(slide, tmp_path, capsys):
    path, _ = slide
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--format", "both"]) == 0
    assert (tmp_path / "x" / "s1.geojson").is_file() and (tmp_path / "x" / "s1.parquet").is_file()
    assert f"{path}:" in capsys.readouterr().out

    bare = make_store(tmp_path / "bare.zarr", np.zeros((8, 8), np.uint32))
    zarr.open_group(bare / "labels", mode="r+").__delitem__("instances")
    assert main(["export", str(bare), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"segflow: error: {bare}: no instances to export (run segflow infer first)"]
    assert not (tmp_path / "y" / "bare.geojson").exists()

    assert main(["export", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.zarr" in err[0]


def test_export_error_is_a_value_error():
    assert issubclass(ExportError, ValueError)


def test_cli_folder_exports_the_segmented_stores_only(tmp_path, capsys):
    folder = tmp_path / "stores"
    make_store(folder / "done.zarr", random_objects((40, 40), seed=2, n=6))
    bare = make_store(folder / "bare.zarr", np.zeros((8, 8), np.uint32))
    zarr.open_group(bare / "labels", mode="r+").__delitem__("instances")
    assert main(["export", str(folder), "--format", "table"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{folder / 'done.zarr'}:")
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["done.parquet"]
    assert not list(folder.glob("*.geojson"))


def test_cli_help_names_export_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--format" in out and "--out" in out and "--config" not in out


def test_failed_export_leaves_no_file(tmp_path):
    instances = random_objects((64, 64), seed=4, n=10)
    path = make_store(tmp_path / "s.zarr", instances)
    (path / "labels" / "instances" / "0" / "c" / "1" / "1").write_bytes(b"not a chunk")
    out = tmp_path / "out"
    with pytest.raises(StoreError, match="chunk"):
        export_store(path, out)
    assert list(out.iterdir()) == []


def test_missing_chunk_is_refused_before_writing(tmp_path):
    path = make_store(tmp_path / "s.zarr", random_objects((64, 64), seed=4, n=10))
    (path / "labels" / "instances" / "0" / "c" / "0" / "1").unlink()
    with pytest.raises(StoreError, match="missing"):
        export_store(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
