"""The container images of infra/ install what `make install` installs: every pip command of the
Dockerfiles runs under requirements.lock, the servers run the clients' versions (MLflow,
Prefect), torch comes from its own index at the lock's version, every copied file is in the
repository, and the compose files build and run the images as infra/README.md says.

The slow tests resolve the Dockerfiles' installs against PyPI with `pip install --dry-run`, for
the images' Python and platform, in a clean pip configuration (no local wheel folder, no
extra index): the MLflow image as it is, the segflow image with torch from PyPI, whose
Linux wheel of torch 2.13.0 is the cu130 build. PyTorch's own indexes
(download.pytorch.org, the CPU image's source) are not reached: for them the fast tests check
the index URL and that the lock's pin carries no local version label, so that `torch==2.13.0`
matches `2.13.0+cpu` and `2.13.0+cu130` alike (PEP 440). They skip when PyPI is unreachable.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LOCK = ROOT / "requirements.lock"
SEGFLOW = INFRA / "segflow.Dockerfile"
MLFLOW = INFRA / "mlflow.Dockerfile"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_GPU = INFRA / "docker-compose.gpu.yml"
TORCH_INDEX = "https://download.pytorch.org/whl/"
#: `python:3.11.14-slim-bookworm`: the Python release and the Debian release of a base image.
PYTHON_IMAGE = re.compile(r"python:(?P<python>\d+\.\d+\.\d+)-slim-(?P<debian>[a-z]+)")
#: glibc minor version of each Debian release, for the manylinux wheels its images accept.
GLIBC = {"bookworm": 36, "trixie": 41}


@dataclass(frozen=True)
class Dockerfile:
    """What a Dockerfile installs: base image, build arguments, copied paths, pip commands."""

    base: str
    args: dict[str, str]
    copies: list[str]
    installs: list[list[str]]  # the argv after `pip install`, build arguments substituted

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n", " ", path.read_text())
        lines = [line.strip() for line in text.splitlines()]
        base, args, copies, installs = "", {}, [], []
        for instruction, _, rest in (
            line.partition(" ") for line in lines if line and not line.startswith("#")
        ):
            if instruction == "FROM":
                base = rest
            elif instruction == "ARG":
                name, _, default = rest.partition("=")
                args[name] = default
            elif instruction == "COPY":
                copies += rest.split()[:-1]
            elif instruction == "RUN":
                for command in rest.split("&&"):
                    argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], command))
                    if argv[:2] == ["pip", "install"]:
                        installs.append(argv[2:])
        return cls(base, args, copies, installs)

    @property
    def python(self) -> str:
        return PYTHON_IMAGE.fullmatch(self.base)["python"]


@dataclass(frozen=True)
class PipInstall:
    """One `pip install` argv: its options and the requirements it names."""

    options: dict[str, str | None]
    requirements: list[str]

    @classmethod
    def parse(cls, argv: list[str]) -> PipInstall:
        valued = {"-c", "--constraint", "--index-url", "-i"}
        options, requirements, words = {}, [], iter(argv)
        for word in words:
            if word in valued:
                options[word] = next(words)
            elif word.startswith("-"):
                options[word] = None
            else:
                requirements.append(word)
        return cls(options, requirements)

    @property
    def constraints(self) -> str | None:
        return self.options.get("-c", self.options.get("--constraint"))


def lock() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def services(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


def installs(path: Path) -> list[PipInstall]:
    return [PipInstall.parse(argv) for argv in Dockerfile.read(path).installs]


def test_lock_pins_carry_no_local_version_label():
    """A local label (`+cpu`) exists on one index only; without it the pin matches every build."""
    pins = lock()
    assert len(pins) > 150, "the lock was read"
    assert [name for name, version in pins.items() if version.local] == []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if r.startswith("torch"))
    assert torch.specifier == SpecifierSet(f"=={pins['torch']}")
    assert all(Version(v) in torch.specifier for v in ("2.13.0+cpu", "2.13.0+cu130"))


def test_images_run_the_locked_python():
    locked = re.search(r"CPython (\d+\.\d+)", LOCK.read_text())[1]
    python = {Dockerfile.read(path).python for path in (SEGFLOW, MLFLOW)}
    assert len(python) == 1, f"the images differ in Python: {python}"
    (release,) = python
    assert release.rsplit(".", 1)[0] == locked
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert Version(release) in SpecifierSet(project["requires-python"])


def test_servers_run_the_clients_versions():
    pins = lock()
    prefect = services(COMPOSE)["prefect-server"]["image"]
    python = Dockerfile.read(SEGFLOW).python.rsplit(".", 1)[0]
    assert prefect == f"prefecthq/prefect:{pins['prefect']}-python{python}"
    (server,) = installs(MLFLOW)
    assert Requirement(server.requirements[0]).name == "mlflow"
    # The lock sets the server's version, the one segflow's clients install.
    assert pins["mlflow"] == pins["mlflow-skinny"] == pins["mlflow-tracing"]


@pytest.mark.parametrize("path", [SEGFLOW, MLFLOW], ids=lambda p: p.name)
def test_every_install_takes_its_versions_from_the_lock(path):
    pins = lock()
    commands = installs(path)
    assert commands, "the check saw the pip commands"
    for command in commands:
        assert Path(command.constraints or "").name == "requirements.lock", command
        for text in command.requirements:
            if text == ".":
                continue
            requirement = Requirement(text)
            assert canonicalize_name(requirement.name) in pins, f"{text}: not in the lock"
            assert not requirement.specifier, f"{text}: a version beside the lock's"


def test_torch_comes_from_its_own_index_before_segflow():
    image = Dockerfile.read(SEGFLOW)
    torch, project = (PipInstall.parse(argv) for argv in image.installs)
    assert torch.requirements == ["torch"] and "--no-deps" in torch.options
    assert torch.options["--index-url"] == TORCH_INDEX + image.args["TORCH_VARIANT"]
    assert image.args["TORCH_VARIANT"] == "cpu"
    assert project.requirements == ["."] and "--index-url" not in project.options


@pytest.mark.parametrize("path", [SEGFLOW, MLFLOW], ids=lambda p: p.name)
def test_copied_files_are_in_the_repository_and_the_build_context(path):
    """Each COPY source is tracked by git (so a clean clone has it) and let through by the
    Dockerfile's own ignore file (BuildKit's `<Dockerfile>.dockerignore`)."""
    ignore = Path(f"{path}.dockerignore").read_text().splitlines()
    assert "*" in ignore, "the context is a list of what the image needs"
    copies = Dockerfile.read(path).copies
    assert "requirements.lock" in copies
    for source in copies:
        tracked = subprocess.run(
            ["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True
        )
        assert tracked.stdout.strip(), f"{source}: not in the repository"
        assert f"!{source}" in ignore, f"{source}: left out of the build context"


def test_compose_builds_and_runs_the_images_as_documented():
    stack, gpu = services(COMPOSE), services(COMPOSE_GPU)
    assert stack["mlflow"]["build"] == {"context": "..", "dockerfile": "infra/mlflow.Dockerfile"}
    build = stack["dask-scheduler"]["build"]
    assert (build["context"], build["dockerfile"]) == ("..", "infra/segflow.Dockerfile")
    for stack_file, variant in ((stack, "cpu"), (stack | gpu, "cu130")):
        built = {**build["args"], **stack_file["dask-scheduler"].get("build", {}).get("args", {})}
        assert built["TORCH_VARIANT"] == variant
        for name in ("dask-scheduler", "dask-worker", "prefect-worker"):
            assert stack_file[name]["image"] == f"segflow:{variant}", name
    # GPUs for inference (Dask workers) and training (the Prefect worker runs the flow).
    for name in ("dask-worker", "prefect-worker"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    readme = (INFRA / "README.md").read_text()
    assert "docker-compose.gpu.yml" in readme and "TORCH_VARIANT" in readme


# --- Resolution on PyPI -------------------------------------------------------------------

#: pip settings about the network, kept; every other PIP_* (local wheel folders, extra
#: indexes, constraints) would let the check pass where a clean machine fails.
NETWORK_SETTINGS = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT"}


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10):
            return True
    except OSError:
        return False


def resolve(image: Dockerfile, requirements: list[str], tmp_path: Path) -> dict[str, Version]:
    """{name: version} that `pip install -c requirements.lock REQUIREMENTS` picks on PyPI for
    the image's Python and Linux (its Debian's glibc), from wheels only, installing nothing."""
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable")
    found = PYTHON_IMAGE.fullmatch(image.base)
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC[found["debian"]], 16, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    argv += ["--quiet", "--report", "-", "--only-binary=:all:", "--target", str(tmp_path)]
    argv += ["--python-version", found["python"], "--implementation", "cp"]
    argv += [option for platform in platforms for option in ("--platform", platform)]
    argv += ["-c", str(LOCK), *requirements]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in NETWORK_SETTINGS}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: PyPI only
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    return {
        canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
        for item in report["install"]
    }


def _requirements(image: Dockerfile) -> list[str]:
    return [r for argv in image.installs for r in PipInstall.parse(argv).requirements]


@pytest.mark.slow
def test_segflow_image_resolves_on_pypi_with_the_lock(tmp_path):
    """Both installs of the image at once, torch from PyPI (the cu130 build) instead of
    PyTorch's index: ~90 s, most of it fetching the metadata of ~220 wheels."""
    pins, image = lock(), Dockerfile.read(SEGFLOW)
    resolved = resolve(image, _requirements(image), tmp_path)
    assert resolved["torch"] == pins["torch"]
    assert {name: v for name, v in resolved.items() if name in pins and v != pins[name]} == {}
    # Outside the lock: segflow, and what the CUDA build of torch pins exactly itself.
    unlocked = set(resolved) - set(pins) - {"segflow"}
    assert unlocked and all(re.match(r"nvidia-|cuda-|triton$", n) for n in unlocked), unlocked
    # The CUDA runtime PyPI's torch brings is the one docker-compose.gpu.yml's variant names.
    variant = services(COMPOSE_GPU)["dask-scheduler"]["build"]["args"]["TORCH_VARIANT"]
    cuda = resolved["nvidia-cuda-runtime"]
    assert variant == f"cu{cuda.major}{cuda.minor}"


@pytest.mark.slow
def test_mlflow_image_resolves_on_pypi_entirely_from_the_lock(tmp_path):
    """~20 s: every package of the MLflow server is pinned by the lock, mlflow at the clients'
    version."""
    pins, image = lock(), Dockerfile.read(MLFLOW)
    resolved = resolve(image, _requirements(image), tmp_path)
    assert resolved["mlflow"] == pins["mlflow"]
    assert {name: (v, pins.get(name)) for name, v in resolved.items() if pins.get(name) != v} == {}
