"""The package as users install it: a wheel built from this checkout, installed into a fresh virtual environment,
run from outside the source tree. `make test` installs the project editable, so only this test sees what a wheel
leaves out (the native kernels' header once did: every bank then fell back to aten, int2 holding 1.76x its budget).
"""
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_with_native_kernels_and_generates(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)])
    wheel = next(dist.glob("dynaexq-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py, pip = env_dir / "bin" / "python", [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q"]
    import torch
    _run(pip + [f"torch=={torch.__version__.split('+')[0]}"])  # the CPU wheel this machine's index holds
    _run(pip + [str(wheel)])
    work = tmp_path / "elsewhere"  # not the checkout: `import dynaexq` must find the installed package
    work.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),  # a fresh build, not a cached one
           "DYNAEXQ_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "error::UserWarning:dynaexq"}
    env.pop("PYTHONPATH", None)
    probe = ("import dynaexq, warnings; warnings.simplefilter('error')\n"
             "from dynaexq.quant import lowbit_cpu\n"
             "assert lowbit_cpu.extension() is not None\n"
             "print(dynaexq.__file__)")
    where = _run([str(py), "-c", probe], cwd=work, env=env).stdout.strip()
    assert str(env_dir) in where and str(ROOT) not in where, where
    gen = _run([str(env_dir / "bin" / "dynaexq"), "generate", "--policy", "uniform:int2", "--expert-budget", "int2",
                "--max-new-tokens", "8", "def add(a, b):"], cwd=work, env=env)
    assert gen.stdout.startswith("def add(a, b):") and len(gen.stdout.strip()) > len("def add(a, b):"), gen.stdout
    assert "could not build" not in gen.stderr and "aten" not in gen.stderr, gen.stderr
