"""scripts/setup_env.sh: which mmcv ops it builds, and which CUDA compiler builds the CUDA ones."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_setup(tmp_path, tools, cwd=None, **env_vars):
    """Run the set-up with only ``tools`` (names -> paths) on PATH and a Python that fails at once, so that nothing
    is installed: the run stops at its first step at the latest."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('bash', 'dirname', 'mkdir', 'grep', 'tail', 'realpath'):
        (bin_dir / tool).symlink_to(subprocess.run(['which', tool], capture_output=True, text=True).stdout.strip())
    for name, path in tools.items():
        (bin_dir / name).symlink_to(path)
    env = {k: v for k, v in os.environ.items() if k not in ('CUDA', 'CUDA_HOME', 'VIRTUAL_ENV')}
    env.update({'PATH': str(bin_dir), 'PYTHON': 'false', 'VENV': str(tmp_path / 'venv'),
                'LESA_LIT_CACHE': str(tmp_path / 'cache'), **env_vars})
    return subprocess.run([str(bin_dir / 'bash'), str(ROOT / 'scripts' / 'setup_env.sh')], env=env,
                          capture_output=True, text=True, timeout=30, cwd=cwd)


def _fake_nvcc(tmp_path, release='13.0'):
    nvcc = tmp_path / f'nvcc-{release}'
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.88"\n')
    nvcc.chmod(0o755)
    return nvcc


def test_a_cuda_toolkit_without_a_gpu_builds_the_cpu_ops(tmp_path):
    result = _run_setup(tmp_path, {'nvcc': _fake_nvcc(tmp_path)})
    assert 'mmcv ops: CPU only (CUDA=0' in result.stdout, result.stdout + result.stderr


def test_a_listed_gpu_builds_the_cuda_ops_without_any_nvcc(tmp_path):
    smi = tmp_path / 'nvidia-smi'
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    result = _run_setup(tmp_path, {'nvidia-smi': smi})
    assert 'mmcv ops: CPU and CUDA (CUDA=1' in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize('torch_cuda, nvcc_release, plan', [
    ('13.0', '13.0', 'system'),  # a system nvcc of torch's CUDA version
    ('13.0', '12.4', 'index 13.0'),  # the usual cluster toolkit: CUDA 13.0's compiler from the package index
    ('13.0', '13.1', 'index 13.0'),  # another minor version: the index's
    ('13.0', None, 'index 13.0'),  # the driver only
    ('12.8', None, 'unsupported 12.8'),  # torch for CUDA 12: its compiler is the user's to provide
])
def test_the_cuda_compiler_is_of_torchs_cuda_version(tmp_path, torch_cuda, nvcc_release, plan):
    nvcc = str(_fake_nvcc(tmp_path, nvcc_release)) if nvcc_release else ''
    result = subprocess.run(
        ['bash', '-c', f'source {ROOT}/scripts/cuda_toolkit.sh && cuda_toolkit_plan {torch_cuda} "{nvcc}"'],
        capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (f'system {nvcc}' if plan == 'system' else plan)



def test_the_venv_is_an_absolute_path_whatever_the_working_directory(tmp_path):
    """The mmcv build runs in a temporary directory: a relative VENV (make setup passes .venv) must not reach it."""
    result = _run_setup(tmp_path, {}, cwd=tmp_path, VENV='relative-venv', CUDA='0')
    assert f'virtual environment at {tmp_path.resolve()}/relative-venv ' in result.stdout, result.stdout + result.stderr


def test_the_cuda_runtime_link_is_found_from_another_directory(tmp_path):
    """-lcudart at the link of mmcv's build (in another directory) finds the index packages' libcudart.so.13 through
    the folder cuda_link_dir prints, even for a relative venv path."""
    lib = tmp_path / 'site-packages' / 'nvidia' / 'cu13' / 'lib'
    lib.mkdir(parents=True)
    (lib / 'libcudart.so.13').write_bytes(b'')
    (tmp_path / 'work').mkdir()
    result = subprocess.run(
        ['bash', '-c', f'source {ROOT}/scripts/cuda_toolkit.sh && cuda_link_dir venv site-packages/nvidia/cu13/lib 13'],
        cwd=tmp_path, capture_output=True, text=True, check=True)
    link_dir = Path(result.stdout.strip())
    assert link_dir.is_absolute() and link_dir == tmp_path / 'venv' / 'cuda-link'
    assert (link_dir / 'libcudart.so').resolve() == (lib / 'libcudart.so.13').resolve()
