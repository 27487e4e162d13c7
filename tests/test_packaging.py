"""The package as a user installs it: pyproject.toml builds a wheel, and that wheel, installed into a fresh virtual
environment, runs outside the repository (`vqprior --version`, sampling a shipped checkpoint given its path, the
bundled sample data).

The wheel is built without build isolation (this environment's setuptools) and installed with ``--no-deps``; the new
environment sees this one's dependencies (torch, click, ...) through a ``.pth`` line, so nothing is downloaded. A
``.pth`` path line adds a folder to ``sys.path`` without running the ``.pth`` files inside it, so this
environment's editable install of the working tree is not picked up: the installed wheel is what runs (checked).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vqprior

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints"


def run(*args, cwd, env=None):
    """Run a command; on failure show its output."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv bin folder, a working folder outside the repository) once for the module."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # only what the wheel is built from, so the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("vqprior", "commands"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", root / "dist", source, cwd=root)
    (wheel,) = (root / "dist").glob("vqprior-*.whl")

    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=root)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).strip())
    (site / "dependencies.pth").write_text("".join(f"{folder}\n" for folder in dependency_folders()))
    work = root / "work"
    work.mkdir()
    return wheel, venv / "bin", work, site


def dependency_folders() -> list[str]:
    """The folders this environment imports vqprior's dependencies from (a venv may chain to another one's)."""
    import importlib

    folders = []
    for name in ("torch", "torchvision", "numpy", "click", "PIL", "lmdb", "tqdm"):
        folder = str(Path(importlib.import_module(name).__file__).resolve().parents[1])
        folders += [folder] if folder not in folders else []
    return folders


def clean_env():
    """The environment without anything that would point Python at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_wheel_holds_the_package_the_cli_and_the_sample_data(installed):
    wheel = installed[0]
    assert wheel.name.startswith(f"vqprior-{vqprior.__version__}-"), "the version comes from vqprior/__init__.py"
    names = zipfile.ZipFile(wheel).namelist()
    assert "vqprior/commands/cli.py" in names, "commands/ is installed as vqprior.commands"
    assert "vqprior/data/sample/cifar10_sample.npz" in names
    assert "vqprior/compress/coding.py" in names
    assert not [n for n in names if n.startswith(("tests/", "commands/", "bench/", "scripts/"))]
    sources = {f"vqprior/{p.relative_to(REPO / 'vqprior').as_posix()}" for p in (REPO / "vqprior").rglob("*.py")}
    sources |= {f"vqprior/commands/{p.relative_to(REPO / 'commands').as_posix()}"
                for p in (REPO / "commands").rglob("*.py")}
    missing = sorted(sources - set(names))
    assert not missing, f"modules left out of the wheel (a new subpackage not in pyproject.toml's packages?): {missing}"
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vqprior = vqprior.commands.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_runs_outside_the_repository(installed):
    _, bin_dir, work, site = installed
    env = clean_env()
    where = run(bin_dir / "python", "-c", "import vqprior, vqprior.commands; print(vqprior.__file__); "
                "print(vqprior.commands.__file__)", cwd=work, env=env).split()
    assert all(Path(p).is_relative_to(site) for p in where), f"not the installed wheel: {where}"

    assert f"vqprior {vqprior.__version__}, torch" in run(bin_dir / "vqprior", "--version", cwd=work, env=env)

    run(bin_dir / "vqprior", "sample", SHIPPED / "mnist-prior.pt", "--num", "2", "--seed", "0", "--out", "grid.png",
        "--device", "cpu", "--quiet", cwd=work, env=env)
    assert (work / "grid.png").stat().st_size > 0

    out = run(bin_dir / "vqprior", "evaluate", SHIPPED / "cifar10-pixels-small.pt", "--dataset", "sample",
              "--split", "test", "--limit", "2", "--device", "cpu", "--quiet", cwd=work, env=env)
    assert "bits/dim" in out and "2 items" in out, out
    assert sorted(p.name for p in work.iterdir()) == ["grid.png"], "nothing else written to the working folder"
