"""The package as pip builds it: a wheel that holds every file the fleet reads at run time
besides its modules (the catalog, the Redis scripts, the dashboard's templates), built
without setuptools' warning that a folder of them would be left out."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_catalog_scripts_and_templates(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert "would be ignored" not in built.stdout + built.stderr
    [wheel] = tmp_path.glob("modelfleet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [
        "router/catalog.yaml",
        *(f"gateway/templates/{p.name}" for p in (ROOT / "gateway/templates").glob("*.html")),
        *(
            f"workers/state/scripts/{p.name}"
            for p in (ROOT / "workers/state/scripts").glob("*.lua")
        ),
    ]
    assert len(wanted) > 20 and not [n for n in wanted if n not in names]
