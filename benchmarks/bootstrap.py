"""Label bootstrap on real nuclei: foreground Dice and IoU of the bootstrapped annotations
against the true masks, next to the classical baseline measured in the same run.

    MoNuSeg 2018 (../shared/data/monuseg_train)   30 H&E tiles, 1000 x 1000 px, 40x; baseline:
                                                  Otsu's threshold on haematoxylin
                                                  (skimage.color.rgb2hed, channel H)
    DSB 2018 (../shared/data/dsb2018_stardist)    one 512 x 512 fluorescence image; baseline:
                                                  Otsu's threshold on intensity

Each data set goes through the real stages as a user would run them: the images are ingested
without their masks (pipelines.ingest.ingest_archive), then `pipelines.bootstrap.
bootstrap_archive` trains one clustering network on tiles of all of them and writes
`labels/annotations`, whose foreground (id > 0) is scored per image against mask > 0 and
averaged. The nucleus clusters come from the stated automatic rule unless `--nucleus` names
them. A data set that is absent is skipped with a line saying so.

With `--scribbles N`, each data set is bootstrapped a second time with strokes as a user would
dab them (simulated from the masks, seeded): stroke 1 on N nuclei per image (a disc of 2 px
around each one's innermost pixel) and stroke 2 on N stroma spots (3 px discs at least 8 px
from every nucleus), imported with `pipelines.scribbles.import_scribble_folder` and mapped
`nucleus=1`; the table gains a "scribbles" row. The strokes cover well under 0.1% of the pixels.

With `--unet`, instead of the table, the U-Net bar on MoNuSeg: the held-out tiles of
`benchmarks/monuseg.py` (one per large organ, bladder and colon: 6), and for training the first
`--per-organ` tiles of every organ among the rest (1: 7 tiles, one per organ). U-Net A trains
on the training tiles' true masks; U-Net B on the same tiles ingested without masks and
bootstrapped as above (same clustering settings); both through weights, train (same
TrainConfig, seed 0, no validation store: the last step's weights), registration and
inference (argmax, components), scored by foreground Dice per held-out tile. Also printed:
the bootstrap labels' Dice against the true masks of the training tiles, which bounds B.

Bars (issue 15): the bootstrap beats Otsu on MoNuSeg foreground Dice; U-Net B reaches at
least 85% of U-Net A's mean held-out Dice.
Usage: python benchmarks/bootstrap.py [--workdir DIR] [--tiles 30] [--iterations 1000]
       [--n-tiles 32] [--tile-size 256] [--batch-size 8] [--mu 5] [--device cpu] [--nucleus 3,7]
       [--scribbles N]
       [--unet [--per-organ 1] [--steps 800] [--base 8] [--depth 4] [--output 132]
       [--batch 4] [--lr 2e-3]]
(On a shared, busy 2-core CPU (load 6-9), `--tiles 6 --tile-size 128 --batch-size 4
--iterations 300` took 7 min: 5 for MoNuSeg, 2 for DSB. `--unet --tile-size 128 --batch-size
4 --iterations 300` with the U-Net defaults (base 8, depth 4, 800 steps of 4 x 132^2 output
px, AdamW 2e-3 cosine, ~5 steps/s) took 15 min: bootstrap 10.5, each U-Net 2 with its
weights, inference seconds. A rerun in the same --workdir reuses the ingest, bootstrap and
weights and trains again.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

# benchmarks/monuseg.py, found beside this script: its organ-stratified split and scoring.
from monuseg import HELD_OUT, ORGANS, VALIDATION, organ_of, score_variant, sources, tile_id
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipelines.bootstrap import BootstrapConfig, bootstrap_archive
from pipelines.cluster import ClusterConfig, dask_client
from pipelines.infer import InferConfig, infer_archive
from pipelines.ingest import IngestConfig, ingest_archive
from pipelines.scribbles import import_scribble_folder
from pipelines.sources import SlideSource
from pipelines.train import TrainConfig, train
from pipelines.weightmaps import WeightsConfig, weights_archive
from segcore.bootstrap import ClusteringConfig
from segcore.cluster_classes import stain_feature
from segcore.metrics import dice, iou
from segcore.store import SlideStore

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MONUSEG = DATA / "monuseg_train"
DSB = DATA / "dsb2018_stardist"


def scores(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Foreground (Dice, IoU) of `predicted` against `truth`, both taken as > 0."""
    t, p = (truth > 0).astype(np.uint8), (predicted > 0).astype(np.uint8)
    return float(dice(t, p, 2)[1]), float(iou(t, p, 2)[1])


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """The baseline: haematoxylin (RGB) or intensity (one channel) above Otsu's threshold."""
    feature = stain_feature(image)
    return feature > threshold_otsu(feature)


def monuseg_pairs(limit: int) -> list[tuple[Path, Path]]:
    images = sorted((MONUSEG / "images").glob("*.tif"))[:limit]
    return [(p, MONUSEG / "labels" / f"{p.stem}.png") for p in images]


def dsb_pairs() -> list[tuple[Path, Path]]:
    return [(DSB / "img2d.tif", DSB / "mask2d.tif")]


def read_mask(path: Path) -> np.ndarray:
    return tifffile.imread(path) if path.suffix == ".tif" else np.asarray(Image.open(path))


def simulated_strokes(truth: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Strokes a user might dab (module docstring): 1 on `n` nuclei, 2 on `n` stroma spots."""
    rng = np.random.default_rng(seed)
    strokes = np.zeros(truth.shape, np.uint8)
    rows, cols = np.ogrid[: truth.shape[0], : truth.shape[1]]
    nuclei, count = ndimage.label(truth > 0)
    inside = ndimage.distance_transform_edt(truth > 0)
    for k in rng.choice(np.arange(1, count + 1), size=min(n, count), replace=False):
        y, x = np.unravel_index(int(np.argmax(np.where(nuclei == k, inside, 0))), truth.shape)
        strokes[((rows - y) ** 2 + (cols - x) ** 2 <= 4) & (nuclei == k)] = 1
    ys, xs = np.nonzero(ndimage.distance_transform_edt(truth == 0) >= 8)
    for i in rng.choice(len(ys), size=min(n, len(ys)), replace=False):
        strokes[(rows - ys[i]) ** 2 + (cols - xs[i]) ** 2 <= 9] = 2
    return strokes


def with_scribbles(
    name: str,
    pairs: list[tuple[Path, Path]],
    stores: list[Path],
    workdir: Path,
    config: BootstrapConfig,
    n: int,
    client,
) -> list:
    """Bootstrap `stores` again guided by simulated strokes (`simulated_strokes`)."""
    folder = workdir / f"{name}-strokes"
    folder.mkdir(parents=True, exist_ok=True)
    for seed, ((_, mask_path), store) in enumerate(zip(pairs, stores, strict=True)):
        strokes = simulated_strokes(read_mask(mask_path), n, seed)
        Image.fromarray(strokes).save(folder / f"{store.name.removesuffix('.zarr')}.png")
    import_scribble_folder(folder, stores)
    guided = config.model_copy(update={"nucleus": (1,)})
    results = bootstrap_archive(stores, guided, client=client)
    for result in results:
        if result.status == "failed":
            raise SystemExit(f"{name}: bootstrap with scribbles failed: {result.error}")
    return results


def run(
    name: str,
    pairs: list[tuple[Path, Path]],
    workdir: Path,
    config: BootstrapConfig,
    client,
    scribbles: int = 0,
) -> None:
    """Ingest `pairs`' images, bootstrap them, print per-data-set means side by side."""
    ingest = IngestConfig(chunk_size=512, min_level_size=256, cluster=config.cluster)
    sources = [SlideSource(image=image) for image, _ in pairs]
    started = time.perf_counter()
    ingested = ingest_archive(sources, workdir / name, ingest, client)
    failed = [r for r in ingested if r.status == "failed"]
    if failed:
        raise SystemExit(f"{name}: ingest failed: {failed[0].error}")
    stores = [r.store for r in ingested]
    results = bootstrap_archive(stores, config, client=client)
    seconds = time.perf_counter() - started
    for result in results:
        if result.status == "failed":
            raise SystemExit(f"{name}: bootstrap failed: {result.error}")
    rows = {"bootstrap": [], "otsu": []}
    for (_, mask_path), store in zip(pairs, stores, strict=True):
        truth = read_mask(mask_path)
        slide = SlideStore.open(store)
        rows["bootstrap"].append(scores(truth, slide.annotations[...]))
        rows["otsu"].append(scores(truth, otsu_foreground(slide.image(0)[...])))
    if scribbles:
        mark = time.perf_counter()
        guided = with_scribbles(name, pairs, stores, workdir, config, scribbles, client)
        rows["scribbles"] = [
            scores(read_mask(mask_path), SlideStore.open(store).annotations[...])
            for (_, mask_path), store in zip(pairs, stores, strict=True)
        ]
        print(
            f"{name}: with {scribbles} + {scribbles} strokes per image: "
            f"{guided[0].iterations} iterations, {time.perf_counter() - mark:.1f} s"
        )
    first = results[0]
    print(
        f"\n{name}: {len(pairs)} image(s), {seconds:.1f} s ingest + bootstrap; nucleus "
        f"clusters {list(first.nucleus or ())} ({first.rule}), {first.iterations} iterations"
    )
    print(f"{'method':<12}{'dice':>8}{'iou':>8}")
    means = {}
    for method, values in rows.items():
        means[method] = np.mean(values, axis=0)
        print(f"{method:<12}{means[method][0]:>8.4f}{means[method][1]:>8.4f}")
    ratio = means["bootstrap"][0] / max(means["otsu"][0], 1e-9)
    print(f"bootstrap / otsu dice: {ratio:.3f}")


def unet_split(per_organ: int) -> tuple[dict[str, SlideSource], list[str]]:
    """MoNuSeg's sources and the training tiles: the first `per_organ` tiles of each organ
    that `benchmarks/monuseg.py` neither holds out nor validates on (its held-out tiles are
    the held-out tiles here too)."""
    tiles = sources()
    excluded = set(HELD_OUT + VALIDATION)
    training = [
        t
        for listed in ORGANS.values()
        for t in [t for t in listed if t not in excluded][:per_organ]
    ]
    return tiles, training


def ingested(
    chosen: list[SlideSource], folder: Path, config: BootstrapConfig, client
) -> dict[str, Path]:
    """Ingest `chosen` into `folder` as the clustering table does; store by tile id."""
    ingest = IngestConfig(chunk_size=512, min_level_size=256, cluster=config.cluster)
    results = ingest_archive(chosen, folder, ingest, client)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SystemExit(f"{folder}: ingest failed: {failed[0].error}")
    return {tile_id(r.source.image): r.store for r in results}


def train_unet(
    name: str, stores: list[Path], args: argparse.Namespace, workdir: Path, cluster
) -> str:
    """Weight maps of `stores`' annotations, then one U-Net on them, registered as `name`;
    the model URI. Every U-Net of the comparison gets this same TrainConfig and seed."""
    broken = [
        r for r in weights_archive(stores, WeightsConfig(cluster=cluster)) if r.status == "failed"
    ]
    if broken:
        raise SystemExit(f"{name}: weights failed: {broken[0].error}")
    result = train(
        TrainConfig(
            stores=stores,
            model={"base_channels": args.base, "depth": args.depth, "dropout": 0.5},
            output_size=args.output,
            batch_size=args.batch,
            max_steps=args.steps,
            steps_per_epoch=args.steps,
            checkpoint_every=args.steps,
            log_every=10,
            optimizer={"name": "adamw", "lr": args.lr, "weight_decay": 1e-4, "schedule": "cosine"},
            num_workers=0,  # 2 shared cores: a loader process only competes with the model
            seed=0,
            workdir=workdir,
            experiment=name,
            registered_model_name=name,
        )
    )
    return result.model_uri


def held_out_dice(
    model_uri: str, held_out: dict[str, Path], output_dir: Path, tracking_uri: str, cluster
) -> dict[str, float]:
    """Foreground Dice per held-out tile of `model_uri`'s segmentation (argmax, components)."""
    infer = InferConfig(
        output_dir=output_dir, progress=False, tracking_uri=tracking_uri, cluster=cluster
    )
    results = infer_archive(list(held_out.values()), model_uri, infer)
    broken = [r for r in results if r.status == "failed"]
    if broken:
        raise SystemExit(f"{model_uri}: inference failed: {broken[0].error}")
    return {t: row["dice"] for t, row in score_variant(held_out, output_dir).items()}


def unet_bar(args: argparse.Namespace, config: BootstrapConfig, workdir: Path, client) -> None:
    """U-Net A on the true masks of the training tiles, U-Net B on their bootstrap labels,
    same TrainConfig and seed; both segment the held-out tiles, scored on foreground Dice."""
    tiles, training = unet_split(args.per_organ)
    print(f"\nU-Net on bootstrap labels vs on true labels (MoNuSeg, {MONUSEG})")
    print("training: " + ", ".join(f"{t} ({organ_of(t)})" for t in training))
    print("held out: " + ", ".join(f"{t} ({organ_of(t)})" for t in HELD_OUT))
    times: dict[str, float] = {}
    started = mark = time.perf_counter()
    true = ingested([tiles[t] for t in training + HELD_OUT], workdir / "true", config, client)
    unlabelled = [SlideSource(image=tiles[t].image) for t in training]
    boot = ingested(unlabelled, workdir / "unlabelled", config, client)
    times["ingest"] = time.perf_counter() - mark

    mark = time.perf_counter()
    results = bootstrap_archive([boot[t] for t in training], config, client=client)
    broken = [r for r in results if r.status == "failed"]
    if broken:
        raise SystemExit(f"bootstrap failed: {broken[0].error}")
    times["bootstrap"] = time.perf_counter() - mark
    label_dice = {
        t: scores(
            SlideStore.open(true[t]).annotations[...], SlideStore.open(boot[t]).annotations[...]
        )[0]
        for t in training
    }

    training_dir = workdir / "training"
    tracking_uri = TrainConfig(workdir=training_dir).resolved_tracking_uri
    held_out = {t: true[t] for t in HELD_OUT}
    dice_of: dict[str, dict[str, float]] = {}
    for name, stores in (("true", true), ("bootstrap", boot)):
        mark = time.perf_counter()
        model = train_unet(
            f"bootstrap-bench-{name}",
            [stores[t] for t in training],
            args,
            training_dir,
            config.cluster,
        )
        times[f"weights+train {name}"] = time.perf_counter() - mark
        mark = time.perf_counter()
        output_dir = workdir / "predictions" / name
        dice_of[name] = held_out_dice(model, held_out, output_dir, tracking_uri, config.cluster)
        times[f"infer {name}"] = time.perf_counter() - mark
    wall = time.perf_counter() - started

    print(
        f"\nbudget (both): U-Net base {args.base} depth {args.depth}, {args.steps} steps of "
        f"{args.batch} x {args.output}^2 output px, AdamW lr {args.lr} cosine, seed 0, "
        f"{len(training)} training tiles; bootstrap {config.clustering.max_iterations} "
        f"iterations, {config.n_tiles} tiles of {config.tile_size} px"
    )
    first = results[0]
    print(
        f"bootstrap: nucleus clusters {list(first.nucleus or ())} ({first.rule}), "
        f"{first.iterations} iterations; its labels vs the true masks of the training tiles, "
        "foreground Dice "
        f"{np.mean(list(label_dice.values())):.4f} ("
        + ", ".join(f"{t} {d:.3f}" for t, d in label_dice.items())
        + ")"
    )
    a, b = dice_of["true"], dice_of["bootstrap"]
    print(f"\n{'held out':<10}{'organ':<10}{'A true':>10}{'B boot':>10}")
    for t in HELD_OUT:
        print(f"{t:<10}{organ_of(t):<10}{a[t]:>10.4f}{b[t]:>10.4f}")
    mean_a, mean_b = float(np.mean(list(a.values()))), float(np.mean(list(b.values())))
    print(f"{'mean':<20}{mean_a:>10.4f}{mean_b:>10.4f}")
    ratio = mean_b / max(mean_a, 1e-9)
    print(f"B / A Dice: {ratio:.3f}; bar (>= 0.85): {'PASS' if ratio >= 0.85 else 'FAIL'}")
    print(
        "wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"; all {wall / 60:.1f} min"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tiles", type=int, default=30, help="MoNuSeg tiles used (max 30)")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--n-tiles", type=int, default=32)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per iteration")
    parser.add_argument("--mu", type=float, default=5.0, help="continuity weight (paper: 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nucleus", default=None, help="nucleus cluster ids (default: the rule)")
    parser.add_argument(
        "--scribbles", type=int, default=0, help="also bootstrap with N + N simulated strokes"
    )
    unet = parser.add_argument_group("--unet: U-Net on bootstrap labels vs on true labels")
    unet.add_argument("--unet", action="store_true", help="run this instead of the table")
    unet.add_argument("--per-organ", type=int, default=1, help="training tiles per organ")
    unet.add_argument("--steps", type=int, default=800)
    unet.add_argument("--base", type=int, default=8)
    unet.add_argument("--depth", type=int, default=4)
    unet.add_argument("--output", type=int, default=132, help="training tile output side")
    unet.add_argument("--batch", type=int, default=4)
    unet.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    cluster = ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
    config = BootstrapConfig(
        clustering=ClusteringConfig(
            max_iterations=args.iterations, batch_size=args.batch_size, continuity_weight=args.mu
        ),
        n_tiles=args.n_tiles,
        tile_size=args.tile_size,
        device=args.device,
        nucleus=args.nucleus,
        cluster=cluster,
    )
    with (
        tempfile.TemporaryDirectory() as scratch,
        dask_client(cluster) as client,
    ):
        workdir = args.workdir or Path(scratch)
        if args.unet:
            if not MONUSEG.is_dir():
                print(f"unet: skipped, {DATA} holds no monuseg data")
                return
            unet_bar(args, config, workdir, client)
            return
        for name, present, pairs in (
            ("monuseg", MONUSEG.is_dir(), lambda: monuseg_pairs(args.tiles)),
            ("dsb2018", DSB.is_dir(), dsb_pairs),
        ):
            if not present:
                print(f"{name}: skipped, {DATA} holds no {name} data")
                continue
            run(name, pairs(), workdir, config, client, args.scribbles)


if __name__ == "__main__":
    main()
