"""mmengine's ``CheckpointLoader`` on the package's safe loaders: local paths, http(s) URLs and ``hf-hub:`` ids.

mmengine 0.10 reads checkpoints with a bare ``torch.load`` (``resume``, ``load_from``, ``init_cfg``,
``DetInferencer``), which torch >= 2.6 runs with ``weights_only=True`` and which then refuses mmengine's own
checkpoints. Instead of switching that safety off, every mmengine load goes through
:func:`lesa_lit_models.load_checkpoint`: tensors and plain data (numpy arrays, mmengine's ``HistoryBuffer`` ...)
load, and a file that names anything else is refused. ``hf-hub:ORG/NAME`` (a converted copy on the Hugging Face
Hub, e.g. from ``lesa-lit-convert --push-to-hub``) reads the repo's weights file.
"""
import os
from typing import Any, Optional

import timm
import torch
from mmengine.dist import get_dist_info
from mmengine.runner import CheckpointLoader

from lesa_lit_models import CheckpointError, load_checkpoint, load_checkpoint_file

__all__ = ['register_checkpoint_loader', 'load_from_local', 'load_from_http', 'load_from_hf_hub', 'HF_HUB_PREFIX']

HF_HUB_PREFIX = 'hf-hub:'


# mmengine logs a loader as "Loads checkpoint by <name[10:]> backend": the names follow its own
def load_from_local(filename: str, map_location: Any = None) -> Any:
    return load_checkpoint_file(os.path.expanduser(filename), map_location)


def load_from_http(filename: str, map_location: Any = None, model_dir: Optional[str] = None,
                   progress: bool = True) -> Any:
    """As mmengine's own: rank 0 downloads into the cache first, the other ranks then read the cached file."""
    rank, world_size = get_dist_info()
    if rank == 0:
        checkpoint = load_checkpoint(filename, map_location, cache_dir=model_dir, progress=progress)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            checkpoint = load_checkpoint(filename, map_location, cache_dir=model_dir, progress=False)
    return checkpoint


def load_from_hf_hub(name: str, map_location: Any = None) -> Any:
    """``hf-hub:ORG/NAME[@REVISION]``: the weights of a Hugging Face Hub repo (``model.safetensors``, else
    ``pytorch_model.bin`` read with ``weights_only``), through the Hub cache."""
    try:
        return timm.models.load_state_dict_from_hf(name[len(HF_HUB_PREFIX):], weights_only=True)
    except Exception as e:  # network, authentication and missing-file errors of huggingface_hub
        raise CheckpointError(f'Cannot fetch {name} from the Hugging Face Hub: {type(e).__name__}: {e}. Offline, '
                              f'download the checkpoint and give its path instead.') from e


def register_checkpoint_loader():
    """Make the package's safe loaders mmengine's for paths, http(s) URLs and ``hf-hub:`` ids."""
    # mmengine registers its own loaders for these prefixes, and registering again (the package imported anew, or
    # called by hand) replaces the loader: both need force
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_from_http, force=True)
    CheckpointLoader.register_scheme(prefixes=HF_HUB_PREFIX, loader=load_from_hf_hub, force=True)
