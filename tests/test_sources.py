"""pipelines.sources: which files are slides and which their labels, on the real layouts in
../shared/data and on made-up ones; explicit pairs and manifests, whose bad rows fail in one
line naming the manifest and the row; label files that pair with no slide are left out with a
note (a `segflow: warning:` line and a note in the flow's artifact), never ingested as slides."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from flow_helpers import prefect_api
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.cli import main
from flows.outcomes import RunSummary
from pipelines.sources import (
    IngestError,
    SlideSource,
    discover_sources,
    find_slides,
    looks_like_labels,
    pairing_key,
    read_manifest,
)
from segcore.store import SlideStore
from segcore.synthetic import write_synthetic_slide

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_INGEST = ["chunk_size=128", "min_level_size=64", "cluster.processes=false"]


def data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def touch(folder: Path, *names: str) -> list[Path]:
    """Empty files (discovery reads no pixels; an unreadable stack stays one slide)."""
    paths = [folder / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return paths


def stack(path: Path, pages: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.zeros((pages, 16, 16), np.uint8), photometric="minisblack")
    return path


# --- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("a_labels.png", True),
        ("mask2d.tif", True),
        ("train-labels.tif", True),
        ("trainLabels.tif", True),
        ("x_seg.png", True),
        ("case_GT.png", True),
        ("slide-annotation.tif", True),
        ("binary_masks/TCGA-A7.png", True),
        ("gt/0.png", True),
        ("label/0.png", True),
        ("Binary_Masks_2018/0.png", True),
        ("labelled_cases/0.tif", False),  # a folder holds what its name ends in
        ("test_label_files0/a.tif", False),
        ("img2d.tif", False),
        ("train-volume.tif", False),
        ("GTEx-1117F.svs", False),  # GTEx is a tissue bank, not ground truth
        ("segflow-demo.tif", False),
        ("unlabelled_07.tif", False),
        ("images/TCGA-18-5592-01Z-00-DX1.tif", False),
    ],
)
def test_what_looks_like_labels(path, label):
    assert looks_like_labels(Path("archive", path)) is label


@pytest.mark.parametrize(
    ("image", "labels"),
    [
        ("img2d", "mask2d"),
        ("train-volume", "train-labels"),
        ("a", "a_labels"),
        ("c", "c_mask"),
        ("scan7", "scan7-GT"),
        ("trainImage", "trainLabels"),
        ("TCGA-18-5592-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1"),
    ],
)
def test_pairing_keys_of_a_pair_are_equal(image, labels):
    assert pairing_key(image) == pairing_key(labels)


@pytest.mark.parametrize(("image", "labels"), [("a1", "a-1_mask"), ("a", "a_v2_labels")])
def test_pairing_keys_keep_what_is_not_a_role_word(image, labels):
    assert pairing_key(image) != pairing_key(labels)


def test_label_files_are_never_slides_and_those_without_a_slide_are_noted(tmp_path):
    touch(tmp_path, "a.png", "a_labels.png", "b_mask.png", "c.tif", "notes.txt")
    touch(tmp_path, "masks/c.png", "masks/zz.png", "masks/readme.md")
    found = find_slides([tmp_path])
    assert found.sources == [
        SlideSource(image=tmp_path / "a.png", labels=tmp_path / "a_labels.png"),
        SlideSource(image=tmp_path / "c.tif", labels=tmp_path / "masks" / "c.png"),
    ]
    assert [note.split(":")[0] for note in found.notes] == [
        str(tmp_path / "b_mask.png"),
        str(tmp_path / "masks" / "zz.png"),
    ]
    assert all("pairs with no slide; not ingested" in note for note in found.notes)


def test_the_nearest_label_wins_then_the_slides_own_extension(tmp_path):
    touch(tmp_path, "a.tif", "a_labels.png", "labels/a.tif", "b.tif", "b_mask.png", "b_mask.tif")
    assert discover_sources(tmp_path) == [
        SlideSource(image=tmp_path / "a.tif", labels=tmp_path / "a_labels.png"),
        SlideSource(image=tmp_path / "b.tif", labels=tmp_path / "b_mask.tif"),
    ]
    # The ones not taken are said to pair with no slide rather than dropped silently.
    notes = find_slides([tmp_path]).notes
    assert [n.split(":")[0] for n in notes] == [
        str(tmp_path / "b_mask.png"),
        str(tmp_path / "labels" / "a.tif"),
    ]


def test_a_label_file_two_slides_would_share_is_an_error(tmp_path):
    touch(tmp_path, "a.tif", "a_img.tif", "a_mask.tif")
    with pytest.raises(IngestError, match=re.escape(f"{tmp_path / 'a_mask.tif'}: label file of")):
        find_slides([tmp_path])
    # Named alone, a slide still takes its label: the user chose which one.
    assert find_slides([tmp_path / "a.tif"]).sources == [
        SlideSource(image=tmp_path / "a.tif", labels=tmp_path / "a_mask.tif")
    ]


def test_a_folder_of_labels_alone_has_no_slide_and_says_why(tmp_path):
    touch(tmp_path, "labels/0.png", "labels/1.png")
    with pytest.raises(IngestError, match="no slides found in .*2 label file\\(s\\) pair with no"):
        find_slides([tmp_path / "labels"])
    # Named directly, a label-looking file is a slide: the user said so.
    assert find_slides([tmp_path / "labels" / "0.png"]).sources == [
        SlideSource(image=tmp_path / "labels" / "0.png")
    ]


def test_sibling_label_folders_pair_only_beside_an_image_folder(tmp_path):
    touch(tmp_path, "Tissue_Images/s1.tif", "Binary_Masks/s1.png", "Binary_Masks/s2.png")
    found = find_slides([tmp_path / "Tissue_Images"])
    assert found.sources == [
        SlideSource(
            image=tmp_path / "Tissue_Images" / "s1.tif",
            labels=tmp_path / "Binary_Masks" / "s1.png",
        )
    ]
    assert [n.split(":")[0] for n in found.notes] == [str(tmp_path / "Binary_Masks" / "s2.png")]
    # `batch` is no image folder: what lies beside it is someone else's.
    batch = tmp_path / "other" / "batch"
    touch(tmp_path, "other/batch/s3.tif", "other/masks/s3.png")
    assert find_slides([batch]) == find_slides([batch / "s3.tif"])
    assert find_slides([batch]).sources == [SlideSource(image=batch / "s3.tif")]


# --- the real layouts ----------------------------------------------------------------------


def test_dsb_image_pairs_with_its_mask():
    folder = data("dsb2018_stardist")
    found = find_slides([folder])
    assert found.sources == [SlideSource(image=folder / "img2d.tif", labels=folder / "mask2d.tif")]
    assert found.notes == []


def test_isbi_volume_pairs_with_its_label_stack_page_by_page():
    folder = data("isbi2012_em")
    found = find_slides([folder])
    assert found.sources == [
        SlideSource(image=folder / "train-volume.tif", labels=folder / "train-labels.tif", page=p)
        for p in range(30)
    ]
    assert found.notes == []
    assert found.sources[7].name == "train-volume-p007"
    # And the PNG layout (image/ beside label/) the same way.
    pngs = find_slides([folder / "train" / "image"])
    assert [s.labels for s in pngs.sources] == [
        folder / "train" / "label" / f"{s.image.stem}.png" for s in pngs.sources
    ]
    assert len(pngs.sources) == 30 and pngs.notes == []


@pytest.mark.parametrize(
    ("dataset", "masks"), [("monuseg_sample", "binary_masks"), ("monuseg_train", "labels")]
)
def test_monuseg_images_pair_with_their_masks(dataset, masks):
    images = data(dataset, "images")
    found = find_slides([images])
    assert found.sources and found.notes == []
    for source in found.sources:
        assert source.labels == images.parent / masks / f"{source.image.stem}.png"
    # The data set's top folder holds no slide, only label files: refused, saying so.
    with pytest.raises(IngestError, match="no slides found in .*label file\\(s\\) pair with no"):
        find_slides([images.parent])


# --- explicit pairs and manifests ----------------------------------------------------------


def test_an_explicit_pair_is_taken_as_named(tmp_path):
    image, labels = touch(tmp_path, "scan.tif", "truth/answers.png")
    pair = SlideSource(image=image, labels=labels)
    assert find_slides([pair]).sources == [pair]
    with pytest.raises(IngestError, match=re.escape(f"{tmp_path / 'nope.png'}: no such file")):
        find_slides([SlideSource(image=image, labels=tmp_path / "nope.png")])


def test_manifest_rows_pair_relative_paths_pages_and_unlabelled_slides(tmp_path):
    touch(tmp_path, "a.png", "truth/a.png", "c.png")
    stack(tmp_path / "sub" / "vol.tif", 3)
    stack(tmp_path / "sub" / "answers.tif", 3)
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(
        "image,labels,page\n"
        "a.png,truth/a.png,\n"
        "\n"  # blank lines are skipped
        "sub/vol.tif,sub/answers.tif,2\n"
        "sub/vol.tif,,0\n"  # another page of the same stack is another slide
        " c.png , , \n"
    )
    assert find_slides([manifest]).sources == [
        SlideSource(image=tmp_path / "a.png", labels=tmp_path / "truth" / "a.png"),
        SlideSource(image=tmp_path / "sub/vol.tif", labels=tmp_path / "sub/answers.tif", page=2),
        SlideSource(image=tmp_path / "sub/vol.tif", page=0),
        SlideSource(image=tmp_path / "c.png"),
    ]


def test_manifest_without_a_page_expands_the_stack_with_its_label_pages(tmp_path):
    image, labels = data("isbi2012_em", "train-volume.tif"), data("isbi2012_em", "train-labels.tif")
    manifest = tmp_path / "isbi.csv"  # absolute paths stay as they are
    manifest.write_text(f"image,labels\n{image},{labels}\n")
    assert read_manifest(manifest) == [
        SlideSource(image=image, labels=labels, page=p) for p in range(30)
    ]


BAD_MANIFESTS = {
    "missing image": (
        "image,labels\na.png,a_gt.png\nnope.tif,\n",
        "row 3: {d}/nope.tif: no such file",
    ),
    "missing labels": ("image,labels\na.png,gone.png\n", "row 2: {d}/gone.png: no such file"),
    "image twice": ("image\na.png\nc.png\n./a.png\n", "row 4: {d}/a.png is already in row 2"),
    "page twice": (
        "image,page\nv.tif,1\nv.tif,0\nv.tif,1\n",
        "row 4: {d}/v.tif is already in row 2",
    ),
    "all pages, then one": (
        "image,page\nv.tif,\nv.tif,1\n",
        "row 3: {d}/v.tif is already in row 2",
    ),
    "page not a number": ("image,page\nv.tif,first\n", "row 2: page 'first' is not a whole number"),
    "page beyond the stack": (
        "image,page\nv.tif,3\n",
        "row 2: page 3 of {d}/v.tif, which has 3 page(s)",
    ),
    "unknown column": ("image,mask\na.png,a_gt.png\n", "row 1: unknown column 'mask'"),
    "no image column": ("labels\na_gt.png\n", "row 1: no image column"),
    "too many fields": ("image,labels\na.png,a_gt.png,3\n", "row 2: 3 fields, the header has 2"),
    "no image in a row": ("image,labels\n,a_gt.png\n", "row 2: no image"),
    "empty file": ("", "empty manifest"),
    "header only": ("image,labels,page\n", "no slides in the manifest"),
    "not text": (b"\xff\xfe\x00\x81image\n", "unreadable CSV (not UTF-8 text)"),
    "bad quoting": ('image\na.png\n"c.png"x\n', "row 3: unreadable CSV (',' expected after '\"')"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_bad_manifests_fail_naming_the_file_and_row(tmp_path, case):
    touch(tmp_path, "a.png", "a_gt.png", "c.png")
    stack(tmp_path / "v.tif", 3)
    content, expected = BAD_MANIFESTS[case]
    manifest = tmp_path / "pairs.csv"
    if isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        manifest.write_text(content)
    with pytest.raises(IngestError) as error:
        find_slides([manifest])
    assert str(error.value).startswith(f"{manifest}: " + expected.format(d=tmp_path))
    assert "\n" not in str(error.value)


# --- the command line ----------------------------------------------------------------------


def segflow(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def segflow_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("segflow")]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["ingest", "--manifest", "{d}/pairs.csv"], "{d}/pairs.csv: row 3: {d}/nope.tif: no such"),
        (["run", "--manifest", "{d}/pairs.csv"], "{d}/pairs.csv: row 3: {d}/nope.tif: no such"),
        (["infer", "--archive", "{d}/pairs.csv"], "{d}/pairs.csv: row 3: {d}/nope.tif: no such"),
        (["ingest", "--manifest", "{d}/a.png"], "{d}/a.png: a manifest is a .csv file"),
        (["ingest", "{d}/a.png", "{d}/c.png", "--labels", "{d}/a_gt.png"], "name exactly one"),
        (["ingest", "{d}/a.png", "--labels", "{d}/gone.png"], "{d}/gone.png: no such file"),
    ],
)
def test_cli_refuses_bad_pairs_in_one_line_before_any_work(tmp_path, capsys, argv, expected):
    touch(tmp_path, "a.png", "a_gt.png", "c.png")
    (tmp_path / "pairs.csv").write_text("image,labels\na.png,a_gt.png\nnope.tif,\n")
    workdir = tmp_path / "work"
    argv = [a.format(d=tmp_path) for a in argv]
    code, _, err = segflow(capsys, *argv, "--workdir", str(workdir))
    assert code == 2
    lines = segflow_lines(err)
    assert lines == [lines[0]] and lines[0].startswith("segflow: error: "), err
    assert expected.format(d=tmp_path) in lines[0]
    assert "Traceback" not in err and not workdir.exists()


def artifact_markdown(flow_run_id: str, key: str) -> str:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    return artifact.data


def test_notes_go_into_the_flow_artifact_above_the_slides():
    summary = RunSummary("ingest", notes=["x/b_mask.tif: looks like a label image | left out"])
    lines = summary.markdown().splitlines()
    assert lines[4] == "- note: x/b_mask.tif: looks like a label image \\| left out"
    assert lines.index(lines[4]) < next(i for i, line in enumerate(lines) if line.startswith("|"))


@pytest.mark.slow  # ~40 s: a Prefect server of its own (17 s) and two ingest flow runs
@pytest.mark.integration
def test_cli_ingests_pairs_and_warns_about_label_files_without_a_slide(tmp_path, capsys):
    archive = tmp_path / "archive"
    archive.mkdir()
    write_synthetic_slide(archive / "a.tif", archive / "a_labels.tif", 256, 256, seed=1)
    stray = archive / "b_mask.tif"  # its slide is missing: a warning, not a slide
    tifffile.imwrite(stray, np.ones((256, 256), np.uint8))
    scans, truth = tmp_path / "scans", tmp_path / "truth"
    scans.mkdir()
    truth.mkdir()
    write_synthetic_slide(scans / "s7.tif", truth / "answers-7.tif", 256, 256, seed=2)
    (tmp_path / "pairs.csv").write_text("image,labels\nscans/s7.tif,truth/answers-7.tif\n")
    write_synthetic_slide(scans / "one.tif", truth / "one-truth.tif", 256, 256, seed=3)
    workdir = tmp_path / "work"
    common = [*TINY_INGEST, "--workdir", str(workdir)]

    with prefect_api():
        code, out, err = segflow(
            capsys, "ingest", str(archive), "--manifest", str(tmp_path / "pairs.csv"), *common
        )
        assert code == 0, err
        assert segflow_lines(err) == [
            f"segflow: warning: {stray}: looks like a label image but pairs with no slide; "
            "not ingested (name its slide in a manifest: image,labels)"
        ]
        flow_run_id = re.search(r"Prefect flow run: (\S+)", out).group(1)
        markdown = artifact_markdown(flow_run_id, "segflow-ingest")
        assert f"- note: {stray}: looks like a label image" in markdown

        code, _, err = segflow(
            capsys,
            "ingest",
            str(scans / "one.tif"),
            "--labels",
            str(truth / "one-truth.tif"),
            *common,
        )
        assert code == 0 and segflow_lines(err) == [], err

    stores = workdir / "stores"
    assert sorted(p.name for p in stores.glob("*.zarr")) == ["a.zarr", "one.zarr", "s7.zarr"]
    for name, labels in (
        ("a", archive / "a_labels.tif"),
        ("s7", truth / "answers-7.tif"),
        ("one", truth / "one-truth.tif"),
    ):
        store = SlideStore.open(stores / f"{name}.zarr")
        np.testing.assert_array_equal(
            store.annotations[...] > 0, tifffile.imread(labels) > 0, err_msg=name
        )
