"""The repository works as what it is: a ComfyUI folder with any name, and an installable core with a command.

* The suite runs from a checkout folder whose name is no Python identifier (``acestep-lora``, the name the README
  clones into under ``custom_nodes/``); pytest once imported the root ``__init__.py`` there and failed.
* ``pip install .`` gives the ``acestep_lora`` package and a working ``acestep-lora`` command anywhere.
* One version: pyproject.toml's ``[project] version`` is ``acestep_lora.__version__``.
"""
import importlib.metadata
import os
import shutil
import site
import subprocess
import sys

import pytest

import acestep_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NESTED = "ACESTEP_LORA_NESTED_SUITE"  # set in the copy's run, so it can never start another copy


def project_table() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def copy_checkout(target: str) -> str:
    """The checkout's files (tracked and new, not ignored ones such as .venv) copied to ``target``."""
    try:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the usual clutter
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "demo_output",
                                                                    "output", "runs", "build", "*.egg-info"))
        return target
    for name in filter(None, listed):
        source = os.path.join(ROOT, name)
        if os.path.isfile(source):  # a file deleted but not yet committed is listed too
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(target, name))
    return target


def test_version_has_one_source():
    assert acestep_lora.__version__ == project_table()["version"]


@pytest.mark.skipif(bool(os.environ.get(NESTED)), reason="already the copy's run")
def test_suite_runs_from_a_folder_named_acestep_lora(tmp_path):
    """A few tests that need the pack's folder (the root __init__.py as ComfyUI loads it) from ``acestep-lora``."""
    copy = copy_checkout(str(tmp_path / "acestep-lora"))
    subset = ["tests/test_train.py::test_official_lr_schedule", "tests/test_nodes_pipeline.py::test_node_definitions",
              "tests/test_packaging.py::test_version_has_one_source"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *subset], cwd=copy,
                         env={**os.environ, NESTED: "1"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def test_pip_install_gives_the_command(tmp_path):
    """``pip install .`` into a fresh environment (whose dependencies come from this one through a .pth file, so
    nothing is downloaded): the package and the ``acestep-lora`` command work from any folder."""
    setuptools_version = importlib.metadata.version("setuptools")
    if int(setuptools_version.split(".")[0]) < 77:
        pytest.skip(f"this environment's setuptools {setuptools_version} cannot build the package (pyproject.toml "
                    "needs >= 77); requirements-dev.txt installs a newer one (`make venv`)")
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot create a virtual environment here: {e}")
    python = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    with open(os.path.join(purelib, "dev_environment.pth"), "w") as f:
        f.write("\n".join(extra + site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source = copy_checkout(str(tmp_path / "acestep-lora"))  # pip builds in the tree: keep the checkout clean
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                              source], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = str(venv / ("Scripts" if os.name == "nt" else "bin") / "acestep-lora")
    shown = subprocess.run([command, "--help"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "usage: acestep-lora" in shown.stdout and "tiny-checkpoint" in shown.stdout
    made = subprocess.run([command, "tiny-checkpoint", "ckpt"], cwd=elsewhere, capture_output=True, text=True,
                          env=env, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    assert os.path.isfile(elsewhere / "ckpt" / "acestep-v15-turbo" / "model.safetensors")
    where = subprocess.run([python, "-c", "import acestep_lora; print(acestep_lora.__file__); "
                                          "print(acestep_lora.__version__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    package_file, version = where.stdout.split()
    assert package_file.startswith(purelib) and version == project_table()["version"]  # from the installed metadata
