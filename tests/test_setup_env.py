"""scripts/setup_env.sh: which mmcv ops it builds, and a CUDA build it cannot do refused before any step."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_setup(tmp_path, tools, **env_vars):
    """Run the set-up with only ``tools`` (names -> paths) on PATH and a Python that fails at once, so that nothing
    is installed: the run stops at its first step at the latest."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('bash', 'dirname', 'mkdir', 'grep', 'tail'):
        (bin_dir / tool).symlink_to(subprocess.run(['which', tool], capture_output=True, text=True).stdout.strip())
    for name, path in tools.items():
        (bin_dir / name).symlink_to(path)
    env = {k: v for k, v in os.environ.items() if k not in ('CUDA', 'CUDA_HOME', 'VIRTUAL_ENV')}
    env.update(PATH=str(bin_dir), PYTHON='false', VENV=str(tmp_path / 'venv'), LESA_LIT_CACHE=str(tmp_path / 'cache'),
               **env_vars)
    return subprocess.run([str(bin_dir / 'bash'), str(ROOT / 'scripts' / 'setup_env.sh')], env=env,
                          capture_output=True, text=True, timeout=30)


def _fake_nvcc(tmp_path):
    nvcc = tmp_path / 'nvcc'
    nvcc.write_text('#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.88"\n')
    nvcc.chmod(0o755)
    return nvcc


def test_cuda_build_without_nvcc_stops_before_any_step(tmp_path):
    result = _run_setup(tmp_path, {}, CUDA='1')
    assert result.returncode == 1
    assert 'CUDA=1 needs the CUDA compiler nvcc' in result.stderr and 'CUDA_HOME' in result.stderr, result.stderr
    assert not (tmp_path / 'venv').exists() and not (tmp_path / 'cache').exists()


def test_a_cuda_toolkit_without_a_gpu_builds_the_cpu_ops(tmp_path):
    result = _run_setup(tmp_path, {'nvcc': _fake_nvcc(tmp_path)})
    assert 'mmcv ops: CPU only (CUDA=0' in result.stdout, result.stdout + result.stderr


def test_nvcc_and_a_listed_gpu_build_the_cuda_ops(tmp_path):
    smi = tmp_path / 'nvidia-smi'
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    result = _run_setup(tmp_path, {'nvcc': _fake_nvcc(tmp_path), 'nvidia-smi': smi})
    assert 'mmcv ops: CPU and CUDA (CUDA=1' in result.stdout, result.stdout + result.stderr
