"""Shared by the object-storage tests: a real S3 API (moto in server mode on 127.0.0.1, never a
mock of the client), fresh buckets, and local folders copied up to a prefix."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_helpers import free_port

from pipelines.location import ObjectStorageConfig, ObjectUrl, parse_location
from segcore.synthetic import write_synthetic_slide

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
CREDENTIALS = {"key": "testing", "secret": "testing-secret", "region": "eu-west-1"}


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port; yields its endpoint URL."""
    if not MOTO_SERVER.exists():
        pytest.skip("moto_server is not installed (pip install -e '.[dev]' brings moto[server])")
    port = free_port()
    server = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on port {port}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def new_bucket(storage: ObjectStorageConfig) -> ObjectUrl:
    bucket = parse_location(f"s3://segflow-{uuid.uuid4().hex[:12]}", storage)
    bucket.filesystem().mkdir(bucket.path)
    return bucket


def upload(local: Path, prefix: ObjectUrl) -> None:
    fs = prefix.filesystem()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{prefix.path}/{path.relative_to(local).as_posix()}")


def objects(prefix: ObjectUrl) -> dict[str, bytes]:
    """Every object under `prefix`, by key relative to it."""
    fs = prefix.filesystem()
    return {
        key.removeprefix(f"{prefix.path}/"): fs.cat_file(key)
        for key in sorted(fs.find(prefix.path))
    }


def write_small_archive(folder: Path) -> Path:
    """`folder` holding a labelled tiled TIFF slide (s1) and a PNG with its mask (p1)."""
    write_synthetic_slide(folder / "s1.tif", folder / "s1_labels.tif", 300, 420, seed=3, tile=128)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (200, 260, 3), dtype=np.uint8)).save(folder / "p1.png")
    mask = np.zeros((200, 260), np.uint8)
    mask[40:90, 50:120] = 255
    mask[120:180, 150:230] = 255
    Image.fromarray(mask).save(folder / "p1_mask.png")
    return folder
