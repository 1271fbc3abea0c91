"""Reading upstream checkpoint files: formats, and clear errors for missing, corrupt and mismatched files."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from lesa_lit_models._checkpoint import (
    CheckpointError, load_checkpoint_file, resolve_pretrained_file, unwrap_state_dict, verify_state_dict,
)


@pytest.fixture
def weights():
    return {'conv.weight': torch.randn(4, 3, 3, 3), 'fc.weight': torch.randn(2, 4)}


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'net': {'module.' + k: v for k, v in sd.items()}, 'optim': {'lr': 0.1}, 'epoch': 3},
    lambda sd: {'model': sd, 'optimizer': {}},
    lambda sd: {'meta': {'epoch': 20, 'np': np.arange(3)}, 'state_dict': sd},
], ids=['bare', 'lesa-imagenet', 'lit-model', 'mmdet-meta-numpy'])
def test_every_upstream_wrapping_unwraps_to_the_same_tensors(tmp_path, weights, wrap):
    path = tmp_path / 'ckpt.pth'
    torch.save(wrap(weights), path)
    state_dict = unwrap_state_dict(load_checkpoint_file(path))
    assert state_dict.keys() == weights.keys()
    assert all(torch.equal(state_dict[k], weights[k]) for k in weights)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match='not found.*nope.pth'):
        load_checkpoint_file(tmp_path / 'nope.pth')


@pytest.mark.parametrize('fraction', [0.0005, 0.05, 0.5, 0.999])
def test_truncated_file_is_reported_as_corrupt(tmp_path, fraction):
    path = tmp_path / 'ckpt.pth'
    torch.save({'w': torch.randn(50_000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:max(1, int(len(data) * fraction))])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint_file(path)


def test_truncated_safetensors_is_reported(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / 'model.safetensors'
    save_file({'w': torch.randn(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint_file(path)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    state_dict = {'0.weight': torch.zeros(8, 3, 3, 3), '0.bias': torch.zeros(4), 'extra.weight': torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        verify_state_dict(state_dict, model)
    message = str(info.value)
    assert '2 missing keys: 1.weight, 1.bias' in message
    assert '1 unexpected keys: extra.weight' in message
    assert '0.weight: checkpoint (8, 3, 3, 3) vs model (4, 3, 3, 3)' in message
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict['1.weight'] = torch.zeros(7, 4)
    assert verify_state_dict(state_dict, model, ignore_shape_of=('1.',)) is state_dict


def test_file_overlay_is_read_into_a_state_dict(tmp_path, weights):
    path = tmp_path / 'ckpt.pth'
    torch.save({'net': weights}, path)
    kwargs = resolve_pretrained_file(True, dict(pretrained_cfg_overlay=dict(file=str(path)), num_classes=3))
    assert kwargs['num_classes'] == 3 and 'file' not in kwargs['pretrained_cfg_overlay']
    assert kwargs['pretrained_cfg_overlay']['state_dict']['net'].keys() == weights.keys()
    untouched = dict(pretrained_cfg_overlay=dict(file=str(path)))
    assert resolve_pretrained_file(False, untouched) is untouched
