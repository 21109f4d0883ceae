#!/usr/bin/env bash
# One GPU check, one JSON report: the CUDA tests, GPU inference throughput, a training-step
# throughput line and the tile loader's line, each under its own time limit (together < 8 min).
#
#   bash benchmarks/gpu_check.sh          # on a CUDA host, from the repository root
#   bash benchmarks/gpu_check.sh --cpu    # the same steps, CPU-sized: checks the script itself
#
# Writes ${OUT:-.}/gpu_check.json: the host's GPUs, torch and CUDA versions, then per step its
# command, status (ok, failed, timeout, skipped), seconds, its JSON figures where it gives them
# (train_step, loader) and the last lines it printed. Exits 1 when a step failed or timed out.
#
# Python: $PYTHON, else .venv/bin/python. A missing .venv is created (network needed, not
# counted in those 8 minutes): torch at requirements.lock's version from PyTorch's index for
# $TORCH_VARIANT (default cu130; cu126 and cu128 suit older drivers), then segflow with its
# dev, bench and hpc extras, pinned by the lock. A .venv whose torch has no CUDA gets the CUDA
# build of the same version.
set -uo pipefail

cpu=0
case "${1:-}" in
--cpu) cpu=1 ;;
"") ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2
    exit 2
    ;;
esac
[ -f pyproject.toml ] && [ -d benchmarks ] || {
    echo "gpu_check: run from the repository root" >&2
    exit 2
}

out_dir=${OUT:-.}
mkdir -p "$out_dir"
work=$(mktemp -d /tmp/segflow-gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT # slides and stores; the report keeps each step's last lines
variant=${TORCH_VARIANT:-cu130}
torch_version=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.lock)
py=${PYTHON:-.venv/bin/python}

cuda_torch() {
    "$py" -m pip install -q --force-reinstall --index-url "https://download.pytorch.org/whl/$variant" \
        "torch==$torch_version"
}

if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
    echo "gpu_check: creating .venv (torch $torch_version from the $variant index)"
    python3 -m venv .venv && "$py" -m pip install -q --upgrade pip || exit 1
    if [ "$cpu" = 0 ]; then cuda_torch || exit 1; fi
    grep -v '^torch==' requirements.lock >"$work/constraints.txt"
    "$py" -m pip install -q -c "$work/constraints.txt" -e '.[dev,bench,hpc]' || exit 1
fi
if [ "$cpu" = 0 ] && [ "$("$py" -c 'import torch; print(torch.version.cuda is not None)')" != True ]; then
    echo "gpu_check: $py has a torch without CUDA; installing the $variant build of $torch_version"
    cuda_torch || exit 1
fi
if [ "$cpu" = 0 ] && ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device visible to $py (driver, CUDA_VISIBLE_DEVICES?);" \
        "bash benchmarks/gpu_check.sh --cpu runs the CPU-sized dry path" >&2
    exit 2
fi

# step NAME SECONDS COMMAND...: run with a time limit; output, status and seconds go to $work.
step() {
    local name=$1 limit=$2
    shift 2
    printf '%q ' "$@" >"$work/$name.cmd"
    echo "== $name (at most ${limit} s): $(cat "$work/$name.cmd")"
    local start=$SECONDS
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    echo $((SECONDS - start)) >"$work/$name.seconds"
    case $rc in
    0) echo ok >"$work/$name.status" ;;
    124 | 137) echo timeout >"$work/$name.status" ;;
    *) echo failed >"$work/$name.status" ;;
    esac
    tail -n 5 "$work/$name.log"
}

skip() { # skip NAME REASON
    echo "$2" >"$work/$1.log"
    echo skipped >"$work/$1.status"
    echo "== $1 skipped: $2"
}

# The CUDA tests: every test named for CUDA or GPUs in the files that mention CUDA.
mapfile -t cuda_files < <(grep -l -i cuda tests/test_*.py)
step cuda_tests 75 "$py" -m pytest -q -p no:cacheprovider -m '' -k 'cuda or gpu' -rs \
    --junitxml="$work/cuda_tests.xml" "${cuda_files[@]}"

if [ "$cpu" = 1 ]; then
    step infer 180 "$py" benchmarks/infer.py --size 1024 --base 8 --depth 3 --repeats 1 \
        --skip-monai --skip-allocator --skip-memory --workdir "$work/infer"
    step train_step 45 "$py" benchmarks/train_step.py --json --device cpu --base 8 --depth 3 \
        --batch 1 --steps 1 --repeats 1
    skip train_step_compiled "torch.compile is timed on GPUs only"
else
    step infer 150 "$py" benchmarks/infer.py --gpu --repeats 2 --skip-memory \
        --workdir "$work/infer"
    step train_step 45 "$py" benchmarks/train_step.py --json
    step train_step_compiled 80 "$py" benchmarks/train_step.py --json --compile --repeats 2
fi

if [ -f benchmarks/loader.py ]; then
    sizes=(); [ "$cpu" = 1 ] && sizes=(--size 1024 --draws 50)
    step loader 120 "$py" benchmarks/loader.py --workdir "$work/loader" --json "$work/loader.json" \
        "${sizes[@]}"
else
    skip loader "benchmarks/loader.py is not in this checkout"
fi

GPU_CHECK_WORK=$work GPU_CHECK_CPU=$cpu "$py" - "$out_dir/gpu_check.json" <<'EOF'
"""Gather the steps' results from GPU_CHECK_WORK into one JSON report."""
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

work = Path(os.environ["GPU_CHECK_WORK"])


def read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def last_json(text: str):
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def junit(path: Path):
    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["cases"] = [
        {
            "name": case.get("name"),
            "outcome": next((child.tag for child in case), "passed"),
        }
        for case in suite.iter("testcase")
    ]
    return counts


def gpus() -> list[str]:
    try:
        query = "--query-gpu=name,memory.total,driver_version"
        answer = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        return [line.strip() for line in answer.stdout.splitlines() if line.strip()]
    except OSError:
        return []


steps = {}
for status_file in sorted(work.glob("*.status")):
    name = status_file.stem
    log = read(work / f"{name}.log")
    seconds = read(work / f"{name}.seconds")
    steps[name] = {
        "command": read(work / f"{name}.cmd"),
        "status": read(status_file),
        "seconds": int(seconds) if seconds else None,
        "json": json.loads(read(work / f"{name}.json") or "null") or last_json(log),
        "tail": log.splitlines()[-40:],
    }
steps.get("cuda_tests", {})["junit"] = junit(work / "cuda_tests.xml")
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
report = {
    "mode": "cpu" if os.environ["GPU_CHECK_CPU"] == "1" else "gpu",
    "host": platform.node(),
    "commit": commit.strip(),
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "gpus": gpus(),
    "steps": steps,
}
Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
bad = [name for name, result in steps.items() if result["status"] in ("failed", "timeout")]
print(f"gpu_check: {sys.argv[1]}; " + (f"not ok: {', '.join(bad)}" if bad else "all steps ok"))
sys.exit(1 if bad else 0)
EOF
