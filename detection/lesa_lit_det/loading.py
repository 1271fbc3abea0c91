"""mmengine's ``CheckpointLoader`` on the package's safe loaders: local paths, http(s) URLs and ``hf-hub:`` ids.

mmengine 0.10 reads checkpoints with a bare ``torch.load`` (``resume``, ``load_from``, ``init_cfg``,
``DetInferencer``), which torch >= 2.6 runs with ``weights_only=True`` and which then refuses mmengine's own
checkpoints. Instead of switching that safety off, every mmengine load goes through
:func:`lesa_lit_models._checkpoint.load_checkpoint` (registered by
:func:`~lesa_lit_models._checkpoint.register_mmengine_loader`): tensors and plain data (numpy arrays, mmengine's
``HistoryBuffer`` ...) load, and a file that names anything else is refused. ``hf-hub:ORG/NAME`` (a converted copy
on the Hugging Face Hub, e.g. from ``lesa-lit-convert --push-to-hub``) reads the repo's weights file.
"""
from typing import Any

import timm
from mmengine.runner import CheckpointLoader

from lesa_lit_models._checkpoint import CheckpointError, register_mmengine_loader

__all__ = ['register_checkpoint_loader', 'load_from_hf_hub', 'HF_HUB_PREFIX']

HF_HUB_PREFIX = 'hf-hub:'


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
    register_mmengine_loader()
    # force: registering again (the package imported anew, or called by hand) replaces the loader instead of failing
    CheckpointLoader.register_scheme(prefixes=HF_HUB_PREFIX, loader=load_from_hf_hub, force=True)
