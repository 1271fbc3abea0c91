"""A timm-only install: the package's wheel in a fresh virtual environment with torch, torchvision, timm and the
pure-Python requirements but no mmcv, mmdet, mmengine or pycocotools gives the timm models and ``lesa-lit-convert``.

Nothing is downloaded: the wheel is built from a copy of the sources without build isolation, installed with
``--no-index --no-deps``, and the requirements are the current environment's own distributions, made visible to
the new environment through a ``.pth`` file naming a folder of links to exactly the distributions the wheel's
requirements pull in (their dependency closure, read from the installed metadata).
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DETECTION_DEPENDENCIES = ('mmcv', 'mmdet', 'mmengine', 'pycocotools')

pytestmark = pytest.mark.slow


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / 'source'
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        '.git', '.venv', '*.egg-info', 'build', 'dist', '__pycache__', 'work_dirs', 'data', 'results'))
    wheels = tmp_path / 'wheels'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-index', '--no-build-isolation',
                    '--quiet', '-w', str(wheels), str(source)], check=True, env=_clean_env())
    (wheel,) = wheels.glob('lesa_lit_models-*.whl')
    return wheel


def _wheel_requirements(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith('.dist-info/METADATA')]
        text = archive.read(name).decode()
    return [Requirement(line.split(':', 1)[1].strip()) for line in text.splitlines()
            if line.startswith('Requires-Dist:')]


def _dependency_closure(requirements):
    """The installed distributions that ``requirements`` (no extras) need, by normalised name."""
    def normalise(name):
        return re.sub(r'[-_.]+', '-', name).lower()

    found, todo = {}, [r for r in requirements if r.marker is None or r.marker.evaluate({'extra': ''})]
    while todo:
        requirement = todo.pop()
        name = normalise(requirement.name)
        if name in found:
            continue
        dist = metadata.distribution(requirement.name)
        found[name] = dist
        for line in dist.requires or []:
            dependency = Requirement(line)
            if dependency.marker is None or dependency.marker.evaluate({'extra': ''}):
                todo.append(dependency)
    return found


def _link_distributions(distributions, folder: Path):
    """Link every top-level entry of the distributions' installed files (packages, modules, dist-info) into
    ``folder``."""
    folder.mkdir()
    for dist in distributions.values():
        for file in dist.files or []:
            top = file.parts[0]
            target = Path(dist.locate_file(top))
            if top == '..' or (folder / top).exists() or not target.exists():
                continue
            (folder / top).symlink_to(target)


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    env.update(PIP_NO_INDEX='1', PIP_CONSTRAINT='', HF_HUB_OFFLINE='1')
    return env


CHECK = f'''
import sys
import timm, torch
import lesa_lit_models
assert lesa_lit_models.__file__.startswith(sys.prefix), lesa_lit_models.__file__
model = timm.create_model('lit_s', features_only=True).eval()
with torch.no_grad():
    features = model(torch.randn(1, 3, 64, 96))
assert [f.shape[-1] for f in features] == [24, 12, 6, 3], [f.shape for f in features]
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {DETECTION_DEPENDENCIES + ('lesa_lit_det',)!r})
assert not loaded, loaded
for name in {DETECTION_DEPENDENCIES!r}:
    try:
        __import__(name)
    except ImportError:
        continue
    raise AssertionError(name + ' is importable in the timm-only environment')
try:
    import lesa_lit_det
except ImportError as error:
    assert 'lesa-lit-models[detection]' in str(error), error
else:
    raise AssertionError('lesa_lit_det imported without mmdet')
print('timm-only install OK')
'''


def test_wheel_installs_timm_models_without_detection_dependencies(tmp_path):
    wheel = _build_wheel(tmp_path)
    closure = _dependency_closure(_wheel_requirements(wheel))
    assert {'torch', 'torchvision', 'timm'} <= closure.keys()
    assert not closure.keys() & set(DETECTION_DEPENDENCIES), sorted(closure)

    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    site = Path(subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               check=True, capture_output=True, text=True).stdout.strip())
    _link_distributions(closure, tmp_path / 'requirements')
    (site / 'timm_only_requirements.pth').write_text(str(tmp_path / 'requirements') + '\n')
    env = _clean_env()
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-index', '--no-deps',
                    '--quiet', str(wheel)], check=True, env=env)

    def run(*command):
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert 'timm-only install OK' in run(str(python), '-c', CHECK)
    usage = run(str(venv / 'bin' / 'lesa-lit-convert'), '--help')
    assert usage.startswith('usage: lesa-lit-convert'), usage
