"""The numeric layout of a model's output: what, besides weights, input and settings, decides
its last bits. Its own module, free of Dask-client and MLflow imports, because workers build it
(pipelines.inference.model) and stage identities record it (pipelines.stage)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class NumericLayout(BaseModel):
    """How a model's arithmetic was laid out: what can change the last bits of its output for
    the same weights, input and settings. Two layouts that differ are two outputs, so a run
    never combines blocks computed under both (resume and cache compare identities).

    Measured (benchmarks/thread_bits.py, torch 2.13 CPU, oneDNN): a U-Net's logits under 1
    torch thread differ from those under 2, 3 or 4 threads (which agree) in 44-63% of values
    by up to 2e-6; on a 4096² slide that moved 1 class-map px of 16.7 M (issue 14).

        NumericLayout(device="cpu", hardware="AVX2", precision="float32", threads=8,
                      torch="2.13.0+cpu")
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: "cpu" or "cuda".
    device: str
    #: The kernels' target: the CPU's vector ISA (torch's CPU capability) or the GPU's name.
    hardware: str
    #: The forward pass's dtype ("float32", "bfloat16").
    precision: str
    #: torch threads per forward pass on a CPU (oneDNN picks its kernels by them); None on a GPU.
    threads: int | None
    #: torch's version (kernels change between releases).
    torch: str
