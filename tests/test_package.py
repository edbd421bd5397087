"""The package as a new user gets it: build the sdist and the wheel, install the wheel in a fresh venv,
run the command line from another directory, and run the sdist's own tests against the installed wheel."""
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = os.environ.get("TORCHSLIM_TORCH", "torch==2.13.0")   # the wheel these machines carry (scripts/setup.sh)


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.timeout(900)   # a fresh venv with torch: ~70 s of CPU, minutes of wall time on a busy machine
def test_wheel_and_sdist_install_and_run_from_a_fresh_venv(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    # --no-isolation: this venv's setuptools (pyproject asks for >= 77, which knows the SPDX license form)
    # builds the sdist, then the wheel from the unpacked sdist, as pip would; nothing is downloaded.
    build = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), REPO], cwd=tmp_path)
    assert "deprecated" not in (build.stdout + build.stderr).lower(), build.stderr[-3000:]
    [wheel] = dist.glob("torchslim-*.whl")
    [sdist] = dist.glob("torchslim-*.tar.gz")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"torchslim/py.typed", "torchslim/data/digits/digits.csv.gz", "torchslim/progress.py"} <= set(names)
    assert not any(n.startswith("tests/") for n in names)
    with tarfile.open(sdist) as tf:
        root = tf.getnames()[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        for needed in ("LICENSE", "README.md", "tests/conftest.py", "tests/models_zoo.py",
                       "tests/dist_scripts/replica.py", "tests/scripts/resume_train.py", "scripts/test.sh",
                       "benchmarks/loop_overhead.py", "torchslim/data/digits/digits.csv.gz"):
            assert needed in members, needed
        tf.extractall(tmp_path / "sdist", filter="data")
    source = tmp_path / "sdist" / root

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    _run([*pip, TORCH], cwd=tmp_path)
    _run([*pip, str(wheel), "pytest", "pytest-timeout"], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"                      # not the checkout: only the installed wheel
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    torchslim_cmd = str(venv / "bin" / "torchslim")
    version = _run([torchslim_cmd, "--version"], cwd=elsewhere, env=env)
    assert version.stdout.startswith("torchslim 0.1.0 (torch 2."), version.stdout
    analyzed = _run([torchslim_cmd, "analyze", "torchslim.demo:DigitsNet", "--input-shape", "1,1,8,8", "--ops"],
                    cwd=elsewhere, env=env)
    assert "Total size of variables: 38282" in analyzed.stdout
    assert "Forward pass: 675.07 kFLOPs = 337.54 kMACs" in analyzed.stdout
    demo = _run([torchslim_cmd, "demo", "--logdir", "run", "--steps", "20", "--save-interval-steps", "10",
                 "--no-analyze"], cwd=elsewhere, env=env)
    assert "global step 10: held-out accuracy" in demo.stdout and "global step 20: held-out accuracy" in demo.stdout
    assert (elsewhere / "run" / "model.ckpt-20.pt").exists()
    where = _run([python, "-c", "import torchslim; print(torchslim.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout

    # the sdist's own tests (a few of each kind: conftest, models_zoo and the data files they need)
    tests = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cli.py",
                  "tests/test_model_analyzer.py", "tests/test_doctests.py", "-k",
                  "help_lists or version or unknown_command or tensor_description or analyze_vars_prints "
                  "or doctests and (learning or progress)"],
                 cwd=source, env=env)
    assert " passed" in tests.stdout and "failed" not in tests.stdout, tests.stdout
