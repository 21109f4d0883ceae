"""Test-process plumbing shared by every test module."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from s3_helpers import CREDENTIALS, moto_server

from pipelines.location import ObjectStorageConfig
from segcore.checkpoint import save_unet
from segcore.model import UNet


@pytest.fixture(autouse=True)
def prefect_console_writes_to_this_tests_stderr() -> Iterator[None]:
    """Prefect's console handler keeps the stream it was built with. Under pytest that is the
    capture of whichever test first set up Prefect's logging, closed when that test ended, so a
    later test's Prefect log line turned into a "--- Logging error ---" traceback on its own
    stderr (never in a real `segflow` process, whose stderr stays open). Point the handlers at
    the stream of the test now running."""
    handlers_module = sys.modules.get("prefect.logging.handlers")
    if handlers_module is not None:
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, handlers_module.PrefectConsoleHandler):
                    # Not setStream: it flushes the old stream, which is the closed one.
                    handler.stream = sys.stderr
                    handler.console.file = sys.stderr
    yield


@pytest.fixture(scope="session")
def untrained_rgb_unet(tmp_path_factory) -> Path:
    """A small untrained RGB U-Net (base 4, depth 3) saved for inference tests that need a
    model file, not a good model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_unet(UNet(3, 2, base_channels=4, depth=3, dropout=0.0).eval(), path)
    return path


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the session."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def s3_storage(s3_endpoint: str) -> ObjectStorageConfig:
    """How to reach `s3_endpoint`, with test credentials."""
    return ObjectStorageConfig(endpoint_url=s3_endpoint, **CREDENTIALS)
