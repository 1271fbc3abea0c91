"""torch.hub entry points for the LESA and LIT models of this repository.

    model = torch.hub.load('/path/to/lesa-lit-models', 'lit_s', pretrained=True, source='local')  # a clone
    model = torch.hub.load('OWNER/NAME', 'lit_s', pretrained=True)  # from GitHub: the owner/name of the repository URL

``/path/to/lesa-lit-models`` is a clone of this repository (``git clone <repository URL> lesa-lit-models``, as in
the README); torch.hub's GitHub form downloads the same files itself.

Every model registered by ``lesa_lit_models`` is an entry point, with timm's keyword arguments
(``pretrained``, ``num_classes``, ``in_chans``, ``features_only``, ``pretrained_cfg_overlay``, ...). Weights load as
with ``timm.create_model``: LIT downloads the authors' GitHub release into the torch hub cache; LESA needs the
authors' file (``pretrained_cfg_overlay=dict(file=PATH)``), see the README.
"""
import timm

from lesa_lit_models import package_models

dependencies = ['torch', 'torchvision', 'timm', 'einops', 'huggingface_hub', 'safetensors']

globals().update({name: timm.models.model_entrypoint(name) for name in package_models()})
