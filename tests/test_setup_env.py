"""scripts/setup_env.sh refuses a CUDA build it cannot do before it creates or installs anything."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_build_without_nvcc_stops_before_any_step(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('bash', 'dirname', 'mkdir'):
        (bin_dir / tool).symlink_to(subprocess.run(['which', tool], capture_output=True, text=True).stdout.strip())
    env = {k: v for k, v in os.environ.items() if k not in ('CUDA_HOME', 'VIRTUAL_ENV')}
    env.update(PATH=str(bin_dir), CUDA='1', VENV=str(tmp_path / 'venv'), LESA_LIT_CACHE=str(tmp_path / 'cache'))
    result = subprocess.run([str(bin_dir / 'bash'), str(ROOT / 'scripts' / 'setup_env.sh')], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert 'CUDA=1 needs the CUDA compiler nvcc' in result.stderr and 'CUDA_HOME' in result.stderr, result.stderr
    assert not (tmp_path / 'venv').exists() and not (tmp_path / 'cache').exists()
