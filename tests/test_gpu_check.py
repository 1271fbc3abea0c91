"""scripts/gpu_check.py (make gpu-check) in its CPU mode: every step the GPU run takes, at tiny sizes, so that
everything but the device itself runs on every change."""
import json
import subprocess
import sys

import pytest

from _helpers import ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_step_and_reports_them(tmp_path, hub_caches):
    result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'gpu_check.py'), '--cpu', '--out', str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['environment']['commit'] and report['environment']['torch']
    assert report['cuda_tests']['status'] == 'ok' and report['cuda_tests']['tests'] > 0
    assert [d['config'].split('/')[1].split('_')[0] for d in report['detectors']] == [
        'mask-rcnn', 'htc', 'retinanet', 'retinanet', 'mask-rcnn', 'mask-rcnn']
    for detector in report['detectors']:
        assert detector['status'] == 'ok', detector
        assert detector['steps'] == 3 and detector['step_s'] > 0 and 'coco/bbox_mAP' in detector['predicted']
    assert report['benchmark']['status'] == 'ok' and (tmp_path / 'bench' / 'results.md').is_file()
    table = (tmp_path / 'gpu_check.md').read_text()
    assert table.count('| ok |') == 6 and report['environment']['commit'] in table
