"""The wheels the images install hold every migration their services apply,
and every other file their packages read: the common-password list, the
email templates.

The Dockerfiles ``pip install`` mesh_common and the service as regular wheels,
so a migration left out of a wheel is missing in the image, and its tables are
never created; a template left out fails each email that needs it. The
editable install of the dev venv reads the source tree and cannot show it:
only a built wheel can. The projects are built here as in an image, copied
without local build debris (as .dockerignore keeps it out: a stale build/ or
egg-info would lend files to the wheel), offline and without build isolation,
so it takes seconds.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

# The projects whose packages hold migrations or other files they read, mesh_common's included.
PROJECTS = [REPO / "services" / name for name in ("common", "user", "todo", "notification")]
SERVICE_PACKAGES = ["user_service", "todo_service", "notification_service"]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, dict[str, bytes]]:
    """Each project's wheel, built by pip: its files by path, per project directory."""
    root = tmp_path_factory.mktemp("wheels")
    debris = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "tests")
    copies = [shutil.copytree(project, root / "src" / project.name, ignore=debris) for project in PROJECTS]
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "-w", str(root / "dist"), *map(str, copies)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert built.returncode == 0, built.stdout + built.stderr

    found: dict[Path, dict[str, bytes]] = {}
    for project in PROJECTS:
        name = tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
        [wheel] = (root / "dist").glob(f"{name.replace('-', '_')}-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            found[project] = {info.filename: archive.read(info) for info in archive.infolist()}
    return found


@pytest.mark.parametrize("package", SERVICE_PACKAGES)
def test_every_migration_a_service_applies_is_in_its_wheel(package: str, wheels: dict[Path, dict[str, bytes]]) -> None:
    migrations: tuple[Path, ...] = importlib.import_module(f"{package}.app").MIGRATIONS
    for directory in migrations:
        sql = sorted(directory.glob("*.sql"))
        assert sql, f"{directory} holds no migration"
        # A path in a wheel is the path in the project: the packages are not under src/.
        owners = [project for project in PROJECTS if directory.is_relative_to(project)]
        assert len(owners) == 1, f"{directory} is in no project built here"
        project = owners[0]
        for path in sql:
            name = path.relative_to(project).as_posix()
            assert name in wheels[project], f"{name} is not in the {project.name} wheel"
            # The runner checks each applied version's checksum against the file.
            assert wheels[project][name] == path.read_bytes(), f"{name} differs in the wheel"


@pytest.mark.parametrize("project", PROJECTS, ids=lambda project: project.name)
def test_every_data_file_of_a_package_is_in_its_wheel(project: Path, wheels: dict[Path, dict[str, bytes]]) -> None:
    # The packages read their files from the installed package, as resources:
    # common_passwords.txt, templates/, the migrations (and py.typed, for mypy).
    wheel = wheels[project]
    packages = sorted({top for top in (name.split("/")[0] for name in wheel) if not top.endswith(".dist-info")})
    # safe.directory: git refuses a checkout another user owns (a CI agent's, run as root) as "dubious".
    tracked = subprocess.run(
        ["git", "-c", f"safe.directory={REPO}", "ls-files", "-z", "--", *packages],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    data = [
        name for name in tracked.stdout.split("\0") if name and not name.endswith(".py") and (project / name).exists()
    ]
    assert data, f"no data file in {packages}"
    assert [name for name in data if name not in wheel] == [], f"not in the {project.name} wheel"
    assert [name for name in data if wheel[name] != (project / name).read_bytes()] == [], "different in the wheel"
