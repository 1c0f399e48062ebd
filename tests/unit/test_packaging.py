"""The built wheel: every module of the four top-level folders installs under the `genq` namespace,
with the data files migrations need, and nothing claims the global names `shared`, `services` or
`workers`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"genq": "genq", "shared": "genq/shared", "services": "genq/services", "workers": "genq/workers"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):  # a copy, so the build leaves nothing in the checkout
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("genq-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_every_module_installs_under_the_genq_namespace(wheel_names: set[str]) -> None:
    expected = {f"{FOLDERS[p.relative_to(ROOT).parts[0]]}/{'/'.join(p.relative_to(ROOT).parts[1:])}"
                for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected - wheel_names == set()


def test_no_global_shared_services_or_workers(wheel_names: set[str]) -> None:
    tops = {n.split("/", 1)[0] for n in wheel_names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"genq"}


def test_migration_files_and_builtin_registry_are_packaged(wheel_names: set[str]) -> None:
    assert {"genq/shared/models.toml", "genq/shared/migrations/script.py.mako",
            "genq/shared/migrations/versions/0001_initial.py"} <= wheel_names
