"""Bad input through the `segflow` command line, case by case, as a careless user or an
attacker would give it.

Every case asserts the exit status, one `segflow: error:` line naming the file and the
problem, no traceback (no --debug), and that nothing new or changed is left outside the
hidden temporary places (dot-named paths, Prefect's own records under `<workdir>/prefect`).
Cases that only reach argument checking never start a flow; the others run the real flows
on a temporary Prefect server, real Zarr stores and real models.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from flow_helpers import prefect_api
from PIL import Image

from flows.cli import main
from pipelines.ingest import IngestConfig, ingest_slide
from pipelines.sources import SlideSource
from pipelines.weightmaps import WeightsConfig, compute_weight_maps
from segcore.checkpoint import save_unet
from segcore.model import UNet
from segcore.synthetic import write_synthetic_slide

pytestmark = pytest.mark.integration

INGEST = ["chunk_size=128", "min_level_size=64", "cluster.processes=false"]
WEIGHTS = ["block_size=128", "cluster.processes=false"]
INFER = ["tile_size=124", "block_size=128", "cluster.processes=false"]
GARBAGE = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@dataclass
class World:
    """Inputs of one case: `inputs` for slides and files, `work` as --workdir."""

    root: Path
    template: Path  # a labelled, weighted store made once per module
    model: Path  # a small U-Net saved weights-only

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def stores(self) -> Path:
        return self.work / "stores"

    def store(self, name: str = "s") -> Path:
        """A copy of the template store at `<work>/stores/<name>.zarr`."""
        path = self.stores / f"{name}.zarr"
        shutil.copytree(self.template, path)
        return path

    def slide(self, name: str = "s.tif", labels: bool = False) -> Path:
        image = self.inputs / name
        mask = self.inputs / f"{Path(name).stem}_labels.tif" if labels else self.root / "t.tif"
        write_synthetic_slide(image, mask, 256, 256, seed=3)
        return image

    def common(self) -> list[str]:
        return ["--workdir", str(self.work)]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("template")
    image, labels = folder / "s.tif", folder / "s_labels.tif"
    write_synthetic_slide(image, labels, 256, 256, seed=3)
    config = IngestConfig(chunk_size=128, min_level_size=64)
    result = ingest_slide(SlideSource(image=image, labels=labels), folder / "stores", config)
    weights = WeightsConfig(block_size=128, cluster={"processes": False, "n_workers": 1})
    compute_weight_maps(result.store, weights)
    return result.store


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.manual_seed(0)
    save_unet(UNet(3, 2, base_channels=4, depth=3), path)
    return path


@pytest.fixture(scope="module")
def prefect() -> Iterator[None]:
    with prefect_api():
        yield


@pytest.fixture
def world(tmp_path, template, model_file, prefect, monkeypatch) -> World:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    w = World(tmp_path, template, model_file)
    w.inputs.mkdir()
    return w


# --- what a case may leave behind ----------------------------------------------------------


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` that is not in a hidden temporary place."""
    files = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        prefect_records = relative.parts[:2] == ("work", "prefect")
        if path.is_file() and not hidden and not prefect_records:
            files[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def assert_error_lines(err: str, fragments: list[str], n_lines: int = 1) -> None:
    """`n_lines` `segflow: error:` lines (one per failed slide), each holding `fragments`."""
    lines = [line for line in err.splitlines() if line.startswith("segflow")]
    assert len(lines) == n_lines, err
    for line in lines:
        assert line.startswith("segflow: error: "), err
        for fragment in fragments:
            assert fragment in line, (fragment, line)


# --- the cases: each returns (argv, fragments the error line must hold) ---------------------


def ingest_missing(w: World):
    return ["ingest", str(w.inputs / "nope.svs")], [f"{w.inputs / 'nope.svs'}: no such file"]


def ingest_nothing(w: World):
    return ["ingest"], ["no slides given"]


def ingest_empty_folder(w: World):
    return ["ingest", str(w.inputs)], [f"{w.inputs}: no slides found in {w.inputs}"]


def ingest_folder_of_non_images(w: World):
    (w.inputs / "notes.txt").write_text("not a slide")
    (w.inputs / "table.csv").write_text("a,b\n1,2\n")
    (w.inputs / "sub").mkdir()
    return ["ingest", str(w.inputs)], ["no slides found in"]


def _bad_slide(name: str, content: bytes, problem: str) -> Callable[[World], tuple]:
    """A folder holding one unreadable slide `name`."""

    def case(w: World):
        (w.inputs / name).write_bytes(content)
        return ["ingest", str(w.inputs)], [f"{w.inputs / name}: ", problem]

    case.__name__ = f"ingest_bad_{name.replace('.', '_')}"
    return case


def ingest_truncated_tiff(w: World):
    w.slide("cut.tif")
    data = (w.inputs / "cut.tif").read_bytes()
    (w.inputs / "cut.tif").write_bytes(data[: len(data) // 2])
    return ["ingest", str(w.inputs / "cut.tif")], [f"{w.inputs / 'cut.tif'}: truncated"]


def ingest_labels_wrong_shape(w: World):
    image = w.slide("s.tif")
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(w.inputs / "s_labels.png")
    return ["ingest", str(image)], [f"{w.inputs / 's_labels.png'}: label image is 100 x 120 px"]


def ingest_float_labels(w: World):
    image = w.slide("s.tif")
    tifffile.imwrite(w.inputs / "s_labels.tif", np.ones((256, 256), np.float32))
    return ["ingest", str(image)], ["s_labels.tif", "non-integer labels (dtype float32)"]


def ingest_negative_labels(w: World):
    image = w.slide("s.tif")
    ids = np.zeros((256, 256), np.int16)
    ids[10, 20] = -3
    tifffile.imwrite(w.inputs / "s_labels.tif", ids)
    return ["ingest", str(image)], ["s_labels.tif", "negative label -3"]


def ingest_white_slide(w: World):
    Image.fromarray(np.full((64, 64, 3), 245, np.uint8)).save(w.inputs / "white.png")
    return ["ingest", str(w.inputs)], [f"{w.inputs / 'white.png'}: empty slide"]


def ingest_two_slides_one_store_name(w: World):
    w.slide("x.tif")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(w.inputs / "x.png")
    tif, png = w.inputs / "x.tif", w.inputs / "x.png"
    # Both slides fail (which one the store should hold is the user's call): two lines.
    return ["ingest", str(w.inputs)], [f"store name x.zarr is shared by {png}, {tif}"], 2


def ingest_over_a_linked_store(w: World):
    image = w.slide("s.tif")
    elsewhere = w.root / "elsewhere"
    shutil.copytree(w.template, elsewhere / "s.zarr")
    w.stores.mkdir(parents=True)
    (w.stores / "s.zarr").symlink_to(elsewhere / "s.zarr")
    argv = ["ingest", str(image), *INGEST, "overwrite=true"]
    return argv, [f"{w.stores / 's.zarr'}: is a symbolic link to {elsewhere / 's.zarr'}"]


def config_file_missing(w: World):
    return ["ingest", str(w.slide()), "--config", "absent.yaml"], [
        "absent.yaml: no such configuration file"
    ]


def config_file_malformed(w: World):
    (w.root / "bad.yaml").write_text("chunk_size: [1, 2\n")
    return ["ingest", str(w.slide()), "--config", str(w.root / "bad.yaml")], [
        "bad.yaml: cannot read configuration"
    ]


def config_file_not_a_mapping(w: World):
    (w.root / "list.yaml").write_text("- 1\n- 2\n")
    return ["weights", "--config", str(w.root / "list.yaml")], ["must be a mapping"]


def config_value_invalid(w: World):
    return ["ingest", str(w.slide()), "chunk_size=-5"], ["invalid IngestConfig: chunk_size:"]


def config_key_unknown(w: World):
    return ["ingest", str(w.slide()), "no_such_setting=3"], [
        "invalid IngestConfig: no_such_setting:"
    ]


def config_override_without_key(w: World):
    return ["ingest", str(w.slide()), "=3"], ["'=3' is not of the form key=value"]


def weights_empty_folder(w: World):
    return ["weights", str(w.inputs)], [f"{w.inputs}: no stores found in"]


def weights_default_folder_missing(w: World):
    return ["weights", *w.common()], [f"{w.stores}: no such file or folder"]


def weights_store_without_zarr_json(w: World):
    store = w.store()
    (store / "zarr.json").unlink()
    return ["weights", str(store)], [f"{store}: not a Zarr store (zarr.json is missing)"]


def weights_store_missing(w: World):
    return ["weights", str(w.stores / "nope.zarr")], ["nope.zarr: no such file or folder"]


def weights_file_named_as_store(w: World):
    (w.inputs / "x.zarr").write_text("not a store")
    return ["weights", str(w.inputs / "x.zarr")], ["x.zarr: not a Zarr store"]


def weights_folder_of_stores_without_zarr_json(w: World):
    store = w.store()
    (store / "zarr.json").unlink()
    return ["weights", str(w.stores)], [f"{w.stores}: no stores found in"]


def weights_unlabelled_store(w: World):
    config = IngestConfig(chunk_size=128, min_level_size=64)
    store = ingest_slide(SlideSource(image=w.slide("u.tif")), w.stores, config).store
    return ["weights", str(store), *WEIGHTS], [f"{store}: no annotations"]


def weights_not_a_segflow_store(w: World):
    store = w.stores / "plain.zarr"
    store.mkdir(parents=True)
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return ["weights", str(store), *WEIGHTS], [f"{store}: not a segflow slide store"]


def weights_store_metadata_garbage(w: World):
    store = w.store()
    (store / "zarr.json").write_text("{ not json")
    return ["weights", str(store), *WEIGHTS], [str(store)]


def _flip_a_byte(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def weights_missing_label_chunk(w: World):
    store = w.store()
    (store / "labels/annotations/0/c/1/0").unlink()
    return ["weights", str(store), *WEIGHTS], [
        f"{store}/labels/annotations/0: chunk c/1/0: missing"
    ]


def weights_corrupt_label_chunk(w: World):
    store = w.store()
    _flip_a_byte(store / "labels/annotations/0/c/0/1")
    return ["weights", str(store), *WEIGHTS], [
        f"{store}/labels/annotations/0: chunk c/0/1: corrupt"
    ]


def weights_missing_label_metadata(w: World):
    store = w.store()
    (store / "labels/annotations/0/zarr.json").unlink()
    return ["weights", str(store), *WEIGHTS], [
        f"{store}/labels/annotations/0: missing array metadata"
    ]


def weights_store_of_an_older_format(w: World):
    store = w.store()
    root = zarr.open_group(store, mode="r+")
    root.attrs["segflow"] = {**root.attrs["segflow"], "store_format": 1}
    return ["weights", str(store), *WEIGHTS], [f"{store}: store format 1", "ingest the slide again"]


def infer_missing_image_chunk(w: World):
    store = w.store()
    (store / "0/c/0/1/0").unlink()
    argv = ["infer", str(store), "--model", str(w.model), *INFER]
    return argv, [f"{store}/0: chunk c/0/1/0: missing"]


def infer_corrupt_image_chunk(w: World):
    store = w.store()
    _flip_a_byte(store / "0/c/0/0/1")
    argv = ["infer", str(store), "--model", str(w.model), *INFER]
    return argv, [f"{store}/0: chunk c/0/0/1: corrupt"]


def infer_missing_image_metadata(w: World):
    store = w.store()
    (store / "0/zarr.json").unlink()
    argv = ["infer", str(store), "--model", str(w.model), *INFER]
    return argv, [f"{store}/0: missing array metadata"]


def infer_sixteen_bit_slide(w: World):
    pixels = np.random.default_rng(2).integers(100, 4096, (256, 256, 3), dtype=np.uint16)
    tifffile.imwrite(w.inputs / "deep.tif", pixels, photometric="rgb")
    config = IngestConfig(chunk_size=128, min_level_size=64)
    store = ingest_slide(SlideSource(image=w.inputs / "deep.tif"), w.stores, config).store
    argv = ["infer", str(store), "--model", str(w.model), *INFER]
    return argv, [f"{store}: image is uint16", "takes uint8 pixels"]


def train_missing_weight_chunk(w: World):
    store = w.store()
    (store / "training/weight/c/0/0").unlink()
    return ["train", str(store), "num_workers=0", "max_steps=2"], [
        f"{store}/training/weight: chunk c/0/0: missing"
    ]


def train_nothing(w: World):
    return ["train", *w.common()], [f"{w.stores}: no stores named and none here"]


def train_store_missing(w: World):
    return ["train", str(w.stores / "nope.zarr")], ["nope.zarr: no such file or folder"]


def train_store_without_zarr_json(w: World):
    store = w.store()
    (store / "zarr.json").unlink()
    return ["train", str(store)], [f"{store}: not a Zarr store (zarr.json is missing)"]


def train_unknown_setting(w: World):
    return ["train", str(w.store()), "optimiser.lr=0.1"], ["invalid TrainConfig: optimiser"]


def infer_empty_folder(w: World):
    return ["infer", str(w.inputs), "--model", str(w.model)], [f"{w.inputs}: no stores found"]


def infer_store_without_zarr_json(w: World):
    store = w.store()
    (store / "zarr.json").unlink()
    return ["infer", str(store), "--model", str(w.model)], ["zarr.json is missing"]


def infer_missing_model_file(w: World):
    model = w.root / "model.pt"
    return ["infer", str(w.store()), "--model", str(model)], [f"{model}: no such file or folder"]


def infer_model_file_garbage(w: World):
    model = w.root / "garbage.pt"
    model.write_bytes(GARBAGE)
    return ["infer", str(w.store()), "--model", str(model), *INFER, *w.common()], [str(model)]


def infer_model_file_that_would_run_code(w: World):
    """A pickle whose loading would create a file: weights-only loading refuses it."""
    model = w.root / "evil.pt"
    torch.save({"state_dict": _Payload(w.root / "PWNED")}, model)
    return ["infer", str(w.store()), "--model", str(model), *INFER, *w.common()], [str(model)]


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def infer_unregistered_model(w: World):
    store = w.store()
    argv = ["infer", str(store), "--model", "models:/absent@champion", *INFER, *w.common()]
    return argv, ["models:/absent@champion: no such model version"]


def infer_empty_archive(w: World):
    return ["infer", "--archive", str(w.inputs), "--model", str(w.model)], ["no slides found in"]


def infer_missing_archive(w: World):
    missing = w.root / "archive"
    return ["infer", "--archive", str(missing)], [f"{missing}: no such file or folder"]


def run_missing_archive(w: World):
    return ["run", str(w.root / "archive")], ["archive: no such file or folder"]


def run_empty_archive(w: World):
    return ["run", str(w.inputs)], [f"{w.inputs}: no slides found in"]


def run_two_archives(w: World):
    return ["run", str(w.inputs), str(w.root)], ["one archive folder at a time, got 2"]


def run_archive_of_non_images(w: World):
    (w.inputs / "readme.md").write_text("# nothing here")
    return ["run", str(w.inputs)], ["no slides found in"]


def serve_empty_archive(w: World):
    return ["serve", str(w.inputs)], [f"{w.inputs}: no slides found in"]


def demo_unknown_setting(w: World):
    return ["demo", "no_such_section.x=1", *w.common()], ["invalid PipelineConfig"]


#: (case, exit status): 2 = refused before any work, 1 = the run went on and a slide failed.
CASES: list[tuple[Callable[[World], tuple], int]] = [
    (ingest_missing, 2),
    (ingest_nothing, 2),
    (ingest_empty_folder, 2),
    (ingest_folder_of_non_images, 2),
    (ingest_truncated_tiff, 1),
    (_bad_slide("garbage.svs", GARBAGE, "not a readable .svs slide"), 1),
    (_bad_slide("empty.tif", b"", "empty file (0 bytes)"), 1),
    (_bad_slide("corrupt.png", b"\x89PNG\r\n\x1a\n" + GARBAGE, "cannot decode"), 1),
    (_bad_slide("fake.ndpi", b"II*\x00" + GARBAGE, "fake.ndpi"), 1),
    (_bad_slide("text.tiff", b"hello, not a tiff", "not a valid .tiff file"), 1),
    (ingest_labels_wrong_shape, 1),
    (ingest_float_labels, 1),
    (ingest_negative_labels, 1),
    (ingest_white_slide, 1),
    (ingest_two_slides_one_store_name, 1),
    (ingest_over_a_linked_store, 1),
    (config_file_missing, 2),
    (config_file_malformed, 2),
    (config_file_not_a_mapping, 2),
    (config_value_invalid, 2),
    (config_key_unknown, 2),
    (config_override_without_key, 2),
    (weights_empty_folder, 2),
    (weights_default_folder_missing, 2),
    (weights_store_without_zarr_json, 2),
    (weights_store_missing, 2),
    (weights_file_named_as_store, 2),
    (weights_folder_of_stores_without_zarr_json, 2),
    (weights_unlabelled_store, 1),
    (weights_not_a_segflow_store, 1),
    (weights_store_metadata_garbage, 1),
    (weights_missing_label_chunk, 1),
    (weights_corrupt_label_chunk, 1),
    (weights_missing_label_metadata, 1),
    (weights_store_of_an_older_format, 1),
    (train_nothing, 2),
    (train_store_missing, 2),
    (train_store_without_zarr_json, 2),
    (train_unknown_setting, 2),
    (train_missing_weight_chunk, 1),
    (infer_empty_folder, 2),
    (infer_store_without_zarr_json, 2),
    (infer_missing_model_file, 2),
    (infer_model_file_garbage, 1),
    (infer_model_file_that_would_run_code, 1),
    (infer_unregistered_model, 1),
    (infer_missing_image_chunk, 1),
    (infer_corrupt_image_chunk, 1),
    (infer_missing_image_metadata, 1),
    (infer_sixteen_bit_slide, 1),
    (infer_empty_archive, 2),
    (infer_missing_archive, 2),
    (run_missing_archive, 2),
    (run_empty_archive, 2),
    (run_two_archives, 2),
    (run_archive_of_non_images, 2),
    (serve_empty_archive, 2),
    (demo_unknown_setting, 2),
]


@pytest.mark.parametrize(("case", "status"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_bad_input(world, case, status, capsys):
    argv, says, *n_lines = case(world)
    if "--workdir" not in argv:
        argv = [*argv, *world.common()]
    if argv[0] == "ingest" and not any(a.startswith("chunk_size") for a in argv):
        argv = [*argv, *INGEST]
    before = _snapshot(world.root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == status, err
    assert_error_lines(err, says, *n_lines)
    assert "Traceback" not in out + err
    assert not (world.root / "PWNED").exists()
    after = _snapshot(world.root)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A read-only file system (EROFS, which even root cannot write)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_workdir(world, read_only_folder, capsys):
    slide = world.slide()
    code = main(["ingest", str(slide), *INGEST, "--workdir", str(read_only_folder / "work")])
    _, err = capsys.readouterr()
    assert code == 2
    assert_error_lines(
        err, [f"{read_only_folder / 'work'}: cannot write here (Read-only file system)"]
    )
