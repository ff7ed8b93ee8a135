"""Shared fixtures. The real default model is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    # AUDITOR_TEST_DATA_DIR reuses extracted vectors between local runs (minutes on 2 cores);
    # CI leaves it unset, so every run extracts from scratch.
    if reused := os.environ.get("AUDITOR_TEST_DATA_DIR"):
        Path(reused).mkdir(parents=True, exist_ok=True)
        return Path(reused)
    return tmp_path_factory.mktemp("auditor-data")


@pytest.fixture(scope="session")
def settings(data_dir):
    from auditor.settings import Settings

    return Settings(data_dir=data_dir, torch_threads=max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def host(settings):
    from workers.serving.host import ModelHost

    return ModelHost(settings)


@pytest.fixture(scope="session")
def model(host):
    return host.model


@pytest.fixture(scope="session")
def bank(host):
    return host.bank()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
