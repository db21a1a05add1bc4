"""Write conda.yaml from requirements.txt, so the pins have one source.

MLflow names a project's conda environment by the hash of conda.yaml's text alone; a
``-r requirements.txt`` line there would let a pin change without the name changing, and
`mlflow run .` would reuse the old environment. So conda.yaml lists the pins themselves,
generated from requirements.txt: `make conda-env` after editing a pin (the test suite
fails while the two disagree).

    python tools/conda_env.py          # rewrite conda.yaml
    python tools/conda_env.py --check  # exit 1 if conda.yaml is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "3.11"


def pins(requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """The requirement lines of requirements.txt, comments and blank lines dropped."""
    lines = (line.split("#")[0].strip() for line in requirements.read_text().splitlines())
    return [line for line in lines if line]


def render(requirements: Path = ROOT / "requirements.txt") -> str:
    body = "".join(f"      - {pin}\n" for pin in pins(requirements))
    return (
        "# Generated from requirements.txt by tools/conda_env.py (`make conda-env`); do not\n"
        "# edit by hand. The pins are listed here, not included with -r, because MLflow names\n"
        "# the conda environment by this file's text: a new pin must give a new name.\n"
        "name: mnist-pipeline\n"
        "channels:\n"
        "  - conda-forge\n"
        "dependencies:\n"
        f"  - python={PYTHON}\n"
        "  - pip\n"
        "  - pip:\n"
        f"{body}"
    )


def main(argv: list[str]) -> int:
    target = ROOT / "conda.yaml"
    if "--check" in argv:
        if target.read_text() != render():
            print("conda.yaml is stale: run `make conda-env`", file=sys.stderr)
            return 1
        return 0
    target.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
