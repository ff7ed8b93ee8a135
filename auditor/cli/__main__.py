"""`python -m auditor.cli`: the same app as the `auditor` console script."""

from auditor.cli import app

if __name__ == "__main__":  # imported, not run (e.g. by a check that imports every module)
    app()
