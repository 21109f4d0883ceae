"""The weights of a torch.export ("pt2") archive, read without unpickling anything.

`torch.export.load` unpickles the archive's sample inputs (and any weight it stored as a
pickle) with weights_only=False, so a crafted archive runs code when loaded. segflow never
needs the traced graph (it rebuilds the U-Net from its configuration), only the weights, and
the pt2 archive stores those as raw bytes described by JSON (docs.pytorch.org: "PT2 Archive
Spec"): `<name>/data/weights/model_weights_config.json` maps every state-dict key to a record
`<name>/data/weights/<path_name>` with dtype, sizes, strides and storage offset. This module
reads exactly that, with zipfile and json, and refuses whatever is not a plain tensor record.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import torch

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"


class Pt2ArchiveError(ValueError):
    """A pt2 archive whose weights cannot be read as plain tensors."""


def _int(value: dict) -> int:
    """A size, stride or offset: only concrete integers (`{"as_int": 4}`) describe weights."""
    if not isinstance(value, dict) or not isinstance(value.get("as_int"), int):
        raise Pt2ArchiveError(f"symbolic or malformed tensor layout {value!r}")
    return value["as_int"]


def _tensor(archive: zipfile.ZipFile, record: str, meta: dict) -> torch.Tensor:
    # The archive's ScalarType enum -> torch dtype: the mapping torch.export itself uses.
    # Imported here: it pulls in torch._dynamo (~2 s), which only registry models need.
    from torch._export.serde.serialize import deserialize_scalar_type

    dtype = deserialize_scalar_type(meta["dtype"])
    sizes = [_int(v) for v in meta["sizes"]]
    strides = [_int(v) for v in meta["strides"]]
    offset = _int(meta["storage_offset"])
    raw = bytearray(archive.read(record))  # writable: torch.frombuffer warns on read-only
    if not raw:  # torch.export writes empty records for zero-element tensors
        return torch.zeros(sizes, dtype=dtype)
    flat = torch.frombuffer(raw, dtype=dtype)
    # as_strided checks the view stays inside `flat`; clone gives each weight its own memory.
    return torch.as_strided(flat, sizes, strides, offset).clone()


def _prefix(archive: zipfile.ZipFile) -> str:
    """The archive's top folder (torch.export.save names it after the file: `model/`)."""
    configs = [n for n in archive.namelist() if n.endswith("/" + WEIGHTS_CONFIG)]
    if len(configs) != 1:
        raise Pt2ArchiveError(f"expected one {WEIGHTS_CONFIG}, found {len(configs)}")
    return configs[0].removesuffix(WEIGHTS_CONFIG)


def pt2_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in the pt2 archive at `path`; raises Pt2ArchiveError for records
    stored as pickles, symbolic shapes, big-endian archives or a corrupt file."""
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _prefix(archive)
            byteorder = archive.read(prefix + "byteorder").decode().strip()
            if byteorder != sys.byteorder:
                raise Pt2ArchiveError(f"weights stored {byteorder}-endian")
            config = json.loads(archive.read(prefix + WEIGHTS_CONFIG))["config"]
            state = {}
            for key, entry in config.items():
                if entry.get("use_pickle", True):
                    raise Pt2ArchiveError(f"weight {key!r} is stored as a pickle")
                record = f"{prefix}data/weights/{entry['path_name']}"
                state[key] = _tensor(archive, record, entry["tensor_meta"])
            return state
    except Pt2ArchiveError:
        raise
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise Pt2ArchiveError(f"unreadable pt2 archive ({type(exc).__name__}: {exc})") from exc
