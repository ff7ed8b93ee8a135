"""`make bench`: every benchmark and evaluation in sequence; results in bench/results/."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The service benchmarks need Postgres and Redis on loopback (see bench/service.py).
for script in (
    "speed.py",
    "probe_quality.py",
    "ingest.py",
    "service_latency.py",
    "serving_overhead.py",
    "concurrency.py",
    "audit_throughput.py",
    "positive_control.py",
    "control_transfer.py",
    "false_alarms.py",
    "load.py",
):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
