"""`make bench`: every benchmark and evaluation in sequence; results in bench/results/."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("speed.py", "probe_quality.py"):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
