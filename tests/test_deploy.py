"""docker-compose.yml stays valid (checked without a Docker engine)."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("client", [["docker-compose"], ["docker", "compose"]])
def test_compose_file_is_valid(client):
    if shutil.which(client[0]) is None:
        pytest.skip(f"{client[0]} not installed")
    if client == ["docker", "compose"] and subprocess.run([*client, "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    result = subprocess.run([*client, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
