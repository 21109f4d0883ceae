"""Imports point one way: flows -> pipelines -> segcore; segcore stays a pure library."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "segcore": {
        "prefect",
        "prefect_dask",
        "mlflow",
        "dask",
        "distributed",
        "lightning",
        "pytorch_lightning",
        "pipelines",
        "flows",
    },
    "pipelines": {"prefect", "prefect_dask", "flows"},
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


#: Inference (and the model loading it uses) runs on hosts without Lightning: it must not
#: import training.
INFERENCE = ("pipelines/infer.py", "pipelines/models.py", "pipelines/inference")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_inference_does_not_import_training():
    files = [p for name in INFERENCE for p in sorted((ROOT / name).rglob("*.py")) or [ROOT / name]]
    assert len(files) > 3
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m
            for m in _imported_modules(path)
            if m.startswith(("pipelines.train", "pytorch_lightning", "lightning"))
        )
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found in {package}/"
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}
