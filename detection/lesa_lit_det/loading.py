"""mmengine's ``CheckpointLoader`` schemes for local files, http(s) URLs and ``hf-hub:`` ids, on safe loaders.

mmengine 0.10 reads checkpoints with a bare ``torch.load`` (``resume``, ``load_from``, ``init_cfg``,
``DetInferencer``), which torch >= 2.6 runs with ``weights_only=True`` and which then refuses mmengine's own
checkpoints. Instead of switching that safety off, every mmengine load goes through
:func:`lesa_lit_models._checkpoint.load_checkpoint_file`: tensors and plain data (numpy arrays, mmengine's
``HistoryBuffer`` and ``ConfigDict``, ...) load, and a file that names anything else is refused. ``hf-hub:ORG/NAME``
(a converted copy on the Hugging Face Hub, e.g. from ``lesa-lit-convert --push-to-hub``) reads its safetensors file.
"""
import os
import os.path as osp
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from mmengine.dist import get_dist_info
from mmengine.runner import CheckpointLoader

from lesa_lit_models._checkpoint import CheckpointError, load_checkpoint_file

__all__ = ['register_checkpoint_loader', 'load_from_local', 'load_from_http', 'load_from_hf_hub']

HF_HUB_PREFIX = 'hf-hub:'


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """A local checkpoint file, read by the safe loader (``map_location`` is ignored: tensors load on the CPU and
    mmengine moves them where they belong)."""
    return load_checkpoint_file(osp.expanduser(filename))


def load_from_http(url: str, map_location: Any = None) -> Any:
    """A checkpoint at an http(s) URL: downloaded once into the torch hub cache (``$TORCH_HOME/hub/checkpoints``),
    then read by the safe loader. In distributed runs local rank 0 downloads while the others wait."""
    cache = osp.join(torch.hub.get_dir(), 'checkpoints')
    path = osp.join(cache, osp.basename(urlparse(url).path))
    rank, world_size = get_dist_info()
    if rank == 0 and not osp.isfile(path):
        os.makedirs(cache, exist_ok=True)
        torch.hub.download_from_http_to_file(url, path, progress=True)
    if world_size > 1:
        torch.distributed.barrier()
    return load_checkpoint_file(path)


def load_from_hf_hub(name: str, map_location: Any = None) -> Any:
    """``hf-hub:ORG/NAME[@REVISION]``: the weights of a Hugging Face Hub repo (``model.safetensors``, else
    ``pytorch_model.bin`` read with ``weights_only``), through the Hub cache."""
    try:
        return timm.models.load_state_dict_from_hf(name[len(HF_HUB_PREFIX):], weights_only=True)
    except Exception as e:  # network, authentication and missing-file errors of huggingface_hub
        raise CheckpointError(f'Cannot fetch {name} from the Hugging Face Hub: {type(e).__name__}: {e}. Offline, '
                              f'download the checkpoint and give its path instead.') from e


def register_checkpoint_loader():
    """Make the loaders above mmengine's for paths, http(s) URLs and ``hf-hub:`` ids."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_from_http, force=True)
    CheckpointLoader.register_scheme(prefixes=HF_HUB_PREFIX, loader=load_from_hf_hub, force=True)
