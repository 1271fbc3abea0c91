"""Convert original LESA / LIT checkpoints to timm's Hugging Face Hub format, verify, and publish them.

The model is built through the family's public loading path,
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``, so the family's
``checkpoint_filter_fn`` stays the single place that understands upstream checkpoint formats. The
export is timm's own (``save_for_hf``); an output folder holds

* ``model.safetensors``: the timm-format state dict,
* ``config.json``: ``architecture``, ``num_classes``, ``model_args`` (only the kwargs the user passed, such as
  ``img_size``) and ``pretrained_cfg``, read by ``timm.create_model('local-dir:DIR')``,
  ``timm.create_model('hf-hub:ORG/NAME')`` and transformers' ``TimmWrapper`` classes,
* ``README.md``: a model card (timm's ``generate_readme``).

A push uploads these verified files as they are.
"""
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi
from timm.models import get_model_input_config, save_for_hf

from . import download_cached, is_url, package_models
from ._timm import generate_readme

__all__ = [
    'ConversionError', 'HubError', 'ExportedFile', 'ConversionResult', 'EXPORT_FILES', 'build_from_checkpoint',
    'make_model_card', 'prepare_output_dir', 'save_converted', 'verify_export', 'check_hub_access', 'push_converted',
    'convert', 'sha256sum',
]

EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md')

# Dataset names for the model card, keyed by the parts of a pretrained tag ('in1k', 'coco', ...).
_TAG_DATASETS = {'in1k': 'ImageNet-1k', 'in22k': 'ImageNet-22k', 'coco': 'COCO'}


class ConversionError(RuntimeError):
    """The conversion cannot start or its result is wrong (unknown model, occupied output dir, mismatch)."""


class HubError(RuntimeError):
    """Publishing to the Hugging Face Hub cannot start or failed (offline, no token, no access, no network)."""


@dataclass
class ExportedFile:
    path: Path
    size: int
    sha256: str


@dataclass
class ConversionResult:
    model: nn.Module
    num_params: int
    files: List[ExportedFile]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    model_card: Dict[str, Any] = field(default_factory=dict)
    max_abs_diff: Optional[float] = None  # output difference of the reloaded export (None: not verified)
    input_size: Optional[Tuple[int, ...]] = None  # input used for the verification
    extra_files: List[str] = field(default_factory=list)  # files already in the output dir that were kept


def sha256sum(path: os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            digest.update(chunk)
    return digest.hexdigest()


def build_from_checkpoint(model_name: str, checkpoint: os.PathLike, **model_kwargs: Any) -> nn.Module:
    """Build ``model_name`` in eval mode with the weights of an original (or timm-format) checkpoint file.

    Raises:
        ConversionError: unknown model name, or kwargs the model does not accept.
        lesa_lit_models.CheckpointError: unreadable file, or a checkpoint of another architecture.
    """
    if model_name.split('.', 1)[0] not in package_models():
        raise ConversionError(
            f'Unknown model {model_name!r}: expected one of {", ".join(package_models())} (optionally with a '
            f'pretrained tag, e.g. lit_s.in1k).')
    reserved = {'pretrained', 'features_only', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path'}
    if reserved & set(model_kwargs):
        raise ConversionError(
            f'Model kwargs {sorted(reserved & set(model_kwargs))} are set by the converter; remove them.')
    try:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(checkpoint)), **model_kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' not in str(e):
            raise
        raise ConversionError(
            f'{model_name} does not accept the model kwargs {model_kwargs}: {e}. Drop or rename the kwarg.') from e
    return model.eval()


def make_model_card(
        model: nn.Module,
        model_ref: str,
        input_size: Tuple[int, int, int],
        source: Optional[Tuple[str, str]] = None,
        extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Model card fields for timm's ``generate_readme`` / ``push_to_hf_hub(model_card=...)``.

    Args:
        model: the converted model (its ``pretrained_cfg`` supplies paper, origin and license).
        model_ref: the ``timm.create_model`` name used in the usage snippet (``hf-hub:ORG/NAME``, ``local-dir:..``).
        input_size: (C, H, W) the model runs at.
        source: (file name, sha256) of the original checkpoint, recorded for provenance.
        extra: card fields that replace the generated ones (``description``, ``citation``, ``details``, ...).
    """
    cfg = model.pretrained_cfg
    arch = cfg.get('architecture', type(model).__name__)
    tag = cfg.get('tag') or ''
    num_params = sum(p.numel() for p in model.parameters())
    is_classifier = model.num_classes > 0
    description = cfg.get('description') or (
        f'A {arch} {"image classification model" if is_classifier else "feature backbone"}'
        + (f' from "{cfg["paper_name"]}"' if cfg.get('paper_name') else '') + '.')
    description += (
        ' Converted from the original authors\' checkpoint to timm format with `lesa-lit-convert` '
        '(lesa-lit-models); the architecture code lives in the `lesa_lit_models` package.')

    stats = {'Params (M)': f'{num_params / 1e6:.1f}', 'Image size': f'{input_size[1]} x {input_size[2]}'}
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone' if is_classifier else 'Feature backbone',
        'Model Stats': stats,
    }
    paper_ids = cfg.get('paper_ids') or ()
    paper_ids = [paper_ids] if isinstance(paper_ids, str) else list(paper_ids)
    if cfg.get('paper_name') or paper_ids:
        links = [f'https://arxiv.org/abs/{p.split(":", 1)[1]}' if p.lower().startswith('arxiv:') else p
                 for p in paper_ids]
        details['Papers'] = {cfg.get('paper_name') or arch: ', '.join(links) or '-'}
    datasets = [_TAG_DATASETS[part] for part in tag.split('_') if part in _TAG_DATASETS]
    if datasets:
        details['Dataset'] = datasets if len(datasets) > 1 else datasets[0]
    if cfg.get('origin_url'):
        details['Original'] = cfg['origin_url']
    if cfg.get('notes'):
        details['Notes'] = list(cfg['notes'])
    if source:
        details['Converted from'] = f'`{source[0]}` (sha256 `{source[1]}`)'

    feature_snippet = (
        f"backbone = timm.create_model('{model_ref}', pretrained=True, features_only=True).eval()\n"
        'for feature, stride in zip(backbone(image), backbone.feature_info.reduction()):\n'
        "    print(f'stride {stride}: {tuple(feature.shape)}')\n")
    usage = (
        '```python\n'
        'import timm\n'
        'import torch\n'
        'import lesa_lit_models  # noqa: F401  registers the LESA / LIT architectures with timm\n\n'
        f"model = timm.create_model('{model_ref}', pretrained=True).eval()\n"
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**data_config, is_training=False)\n'
        'image = transform(pil_image).unsqueeze(0)  # or torch.randn(1, *data_config["input_size"])\n\n'
        + ('with torch.inference_mode():\n'
           '    top5 = model(image).softmax(dim=-1).topk(5)\n\n' if is_classifier else '')
        + '# multi-scale feature maps for detection / segmentation\n'
        + feature_snippet
        + '```\n')
    card = dict(description=description, details=details, usage=usage, license=cfg.get('license', 'apache-2.0'))
    for key, value in (extra or {}).items():
        if key == 'details' and isinstance(value, dict):
            card['details'] = {**card['details'], **value}
        else:
            card[key] = value
    return card


def prepare_output_dir(output_dir: os.PathLike, overwrite: bool = False) -> List[str]:
    """Refuse an existing non-empty output dir unless ``overwrite``; return the files there that will be kept."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f'Output path {str(output_dir)!r} exists and is not a directory; pick a folder path.')
    existing = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if existing and not overwrite:
        listed = ', '.join(existing[:5]) + (' ...' if len(existing) > 5 else '')
        raise ConversionError(
            f'Output directory {str(output_dir)!r} is not empty ({listed}). Choose a new directory, or pass '
            f'--overwrite (overwrite=True) to replace {", ".join(EXPORT_FILES)} in it.')
    return [name for name in existing if name not in EXPORT_FILES]


def save_converted(
        model: nn.Module,
        output_dir: os.PathLike,
        model_ref: str,
        card_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        source: Optional[Tuple[str, str]] = None,
        extra_card: Optional[Dict[str, Any]] = None,
) -> Tuple[List[ExportedFile], Dict[str, Any]]:
    """Write ``model.safetensors`` + ``config.json`` (timm ``save_for_hf``) and ``README.md`` into ``output_dir``.

    ``model_kwargs`` are recorded as ``model_args`` in config.json so that non-default kwargs (``img_size``)
    rebuild the same model, and the input size the model is built for (``img_size`` where given) becomes the
    ``input_size`` of its ``pretrained_cfg``. The card states that size. Returns (files, card).
    """
    output_dir = Path(output_dir)
    save_for_hf(model, output_dir, model_args=dict(model_kwargs or {}), safe_serialization=True,
                data_config=_data_config(model))
    config = _config_for_clients(json.loads((output_dir / 'config.json').read_text()), model_kwargs or {})
    (output_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    card = make_model_card(model, model_ref, tuple(config['pretrained_cfg']['input_size']), source, extra_card)
    (output_dir / 'README.md').write_text(generate_readme(card, card_name, task_name=_task(model)), encoding='utf-8')
    files = [ExportedFile(output_dir / n, (output_dir / n).stat().st_size, sha256sum(output_dir / n))
             for n in EXPORT_FILES]
    return files, card


def _config_for_clients(config: Dict[str, Any], model_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """timm's config.json with ``model_args`` holding only the kwargs the user passed: timm also records every
    model's ``num_classes``, ``in_chans`` and ``global_pool`` there, and transformers' TimmWrapper, which passes
    ``num_classes`` itself (from the root ``num_classes``), fails on the repeat."""
    args = {k: v for k, v in config.get('model_args', {}).items() if k in model_kwargs and k != 'num_classes'}
    return {k: (args if k == 'model_args' else v) for k, v in config.items() if k != 'model_args' or args}


def _data_config(model: nn.Module) -> Dict[str, Any]:
    # the input size the model is built for (its img_size, where given), not the source checkpoint's
    return dict(input_size=get_model_input_config(model)['input_size'])


def _task(model: nn.Module) -> str:
    return 'image-classification' if model.num_classes > 0 else 'image-feature-extraction'


@torch.inference_mode()
def verify_export(model: nn.Module, output_dir: os.PathLike, rtol: float = 1e-5, atol: float = 1e-5,
                  ) -> Tuple[float, Tuple[int, ...]]:
    """Reload ``local-dir:output_dir`` through timm and check it equals ``model``: every tensor, and the output.

    Returns (max abs output difference, input size used). Raises ConversionError on any difference.
    """
    reloaded = timm.create_model(f'local-dir:{Path(output_dir).resolve()}', pretrained=True).eval()
    expected, actual = model.state_dict(), reloaded.state_dict()
    if expected.keys() != actual.keys():
        raise ConversionError(
            f'Reloaded export has different keys: missing {sorted(expected.keys() - actual.keys())[:5]}, '
            f'unexpected {sorted(actual.keys() - expected.keys())[:5]}.')
    changed = [k for k in expected if not torch.equal(expected[k], actual[k])]
    if changed:
        raise ConversionError(f'Reloaded export differs in {len(changed)} tensors, e.g. {changed[:5]}.')
    input_size = tuple(timm.data.resolve_model_data_config(reloaded)['input_size'])  # the export's size
    image = torch.randn((1, *input_size), generator=torch.Generator().manual_seed(0))
    out, out_reloaded = model(image), reloaded(image)
    max_abs_diff = (out - out_reloaded).abs().max().item()
    if out.shape != out_reloaded.shape or not torch.allclose(out, out_reloaded, rtol=rtol, atol=atol):
        raise ConversionError(
            f'Reloaded export gives different outputs: {tuple(out_reloaded.shape)} vs {tuple(out.shape)}, max abs '
            f'difference {max_abs_diff:.3g}. config.json does not rebuild the same model; pass the missing '
            f'model kwargs.')
    return max_abs_diff, (1, *input_size)


# Errors a push can end with: hub HTTP errors and OfflineModeIsEnabled are OSErrors; the transport layer's
# own errors (connection refused, DNS) share a base with HfHubHTTPError whatever HTTP client the hub uses.
def _push_errors() -> Tuple[type, ...]:
    from huggingface_hub.errors import HfHubHTTPError
    return (OSError, *HfHubHTTPError.__bases__)


def check_hub_access(repo_id: str, token: Optional[str] = None) -> None:
    """Fail before any work when a push cannot succeed: malformed repo id, offline mode, no token."""
    from huggingface_hub import constants, get_token
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise HubError(f'Hub repo id {repo_id!r} must be ORG/NAME (e.g. my-org/lit_s.in1k).')
    if getattr(constants, 'is_offline_mode', lambda: constants.HF_HUB_OFFLINE)():
        raise HubError('Cannot push: HF_HUB_OFFLINE is set. Unset it (and make sure the hub is reachable) to push.')
    if token is None and get_token() is None:
        raise HubError(
            f'Cannot push to {repo_id}: no Hugging Face token found. Log in with `hf auth login` or set HF_TOKEN '
            f'to a token with write access to {repo_id.split("/")[0]!r}.')


def push_converted(
        result: ConversionResult,
        repo_id: str,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Add model converted with lesa-lit-convert',
) -> str:
    """Upload the verified files of a conversion (safetensors weights, config.json and, if the repo has none, the
    model card) in one commit, as timm's ``push_to_hf_hub`` does; return the commit URL."""
    check_hub_access(repo_id, token)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        keep_card = api.file_exists(repo_id, 'README.md')
        with tempfile.TemporaryDirectory() as folder:
            for exported in result.files:
                if not (keep_card and exported.path.name == 'README.md'):
                    shutil.copy(exported.path, folder)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    except _push_errors() as e:
        raise HubError(
            f'Pushing to {repo_id} failed: {type(e).__name__}: {e}. Check the network connection and that your '
            f'token has write access to {repo_id.split("/")[0]!r}. The converted files are still on disk.') from e
    return str(getattr(commit, 'commit_url', commit))


def convert(
        model_name: str,
        checkpoint: Union[str, os.PathLike],
        output_dir: os.PathLike,
        model_kwargs: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
        verify: bool = True,
        repo_id: Optional[str] = None,
        model_card: Optional[Dict[str, Any]] = None,
) -> ConversionResult:
    """Original checkpoint (path or http(s) URL) -> timm export in ``output_dir``, verified by reloading it (unless
    ``verify=False``).

    ``repo_id`` (ORG/NAME) names the hub repo the model card's usage snippet loads from; publish the result
    with :func:`push_converted` (check :func:`check_hub_access` first to fail before the work).
    """
    model_kwargs = dict(model_kwargs or {})
    extra_files = prepare_output_dir(output_dir, overwrite)
    if is_url(checkpoint):
        checkpoint = download_cached(checkpoint)
    model = build_from_checkpoint(model_name, checkpoint, **model_kwargs)
    cfg = model.pretrained_cfg
    if repo_id:
        model_ref, card_name = f'hf-hub:{repo_id}', repo_id.split('/')[-1]
    else:
        model_ref = f'local-dir:{Path(output_dir).resolve()}'
        card_name = '.'.join(filter(None, (cfg.get('architecture'), cfg.get('tag'))))
    files, card = save_converted(
        model, output_dir, model_ref, card_name, model_kwargs,
        source=(Path(checkpoint).name, sha256sum(checkpoint)), extra_card=model_card)
    result = ConversionResult(
        model=model, num_params=sum(p.numel() for p in model.parameters()), files=files,
        model_kwargs=model_kwargs, model_card=card, extra_files=extra_files)
    if verify:
        result.max_abs_diff, result.input_size = verify_export(model, output_dir)
    return result
