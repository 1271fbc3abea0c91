"""Reading checkpoint files and release downloads safely, with errors that say what is wrong and how to fix it.

Every entry point of the package (``pretrained=True`` downloads, ``pretrained_cfg_overlay=dict(file=...)``,
``lesa-lit-convert``, ``hubconf.py``, the detection adapter and scripts through :func:`register_mmengine_loader`)
reads files through :func:`load_checkpoint_file` / :func:`load_checkpoint`. They unpickle with
``torch.load(weights_only=True)``: tensors and plain Python data load, and a file may name only the classes and
functions of an explicit allow-list (:func:`allowed_globals`), the ones the authors' release files and mmengine's
own checkpoints need. Nothing a file names is imported, and a file that names anything else (``os.system``,
``builtins.eval``, ``subprocess.Popen``, ...) is refused with :class:`UnsafeCheckpointError` before it can run.

What the authors' files carry besides tensors, and what it becomes here:

* numpy arrays, scalars and dtypes (mmdet 2.x ``meta``, mmengine ``message_hub``): real numpy objects;
* ``argparse.Namespace`` (LIT-Ti's ``args``, DeiT code): a real ``Namespace``;
* ``yacs.config.CfgNode`` (LIT-S/M/B's ``config``, Swin code) and mmengine's ``ConfigDict``: an ``OrderedDict``
  of their items (yacs need not be installed);
* mmengine's ``HistoryBuffer`` (``message_hub``): the real class when mmengine's logging is loaded (a training
  run that resumes), otherwise an :class:`InertObject` holding the same attributes.

Families' ``checkpoint_filter_fn`` then map keys and resample tables; :func:`verify_state_dict` is the one strict
check of the result.
"""
import _compat_pickle
import argparse
import http.client
import logging
import os
import pickle
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import OrderedDict
from typing import IO, Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from timm.models import clean_state_dict

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'DownloadError', 'InertObject', 'allowed_globals',
    'load_checkpoint_file', 'load_checkpoint', 'download_cached', 'register_mmengine_loader', 'unwrap_state_dict',
    'strip_prefix', 'verify_state_dict', 'resolve_pretrained_file',
]

_logger = logging.getLogger(__name__)

# Wrapper keys used by the upstream training scripts, in lookup order:
# mmdet/mmcv ('state_dict'), Swin/DeiT style ('model'), LESA_classification ('net').
_WRAPPER_KEYS = ('state_dict', 'model', 'net')

PathOrFile = Union[str, os.PathLike, IO[bytes]]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or belongs to another architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names code outside the allow-list (it could run it when unpickled); it is not loaded."""


class DownloadError(CheckpointError):
    """A release file could not be downloaded completely."""


# ------------------------------------------------------------------------------------------------ the allow-list


class InertObject:
    """Stands in for an object of a class that is not loaded (its attributes are kept, none of its code runs)."""

    def __repr__(self) -> str:
        return f'InertObject({self.__dict__!r})'


class _MappingAsOrderedDict:
    """Reads a pickled dict subclass (yacs ``CfgNode``, mmengine ``ConfigDict``) as an ``OrderedDict``.

    torch's restricted unpickler only fills exact ``dict`` / ``OrderedDict`` objects with items, so the object
    created for the subclass is an ``OrderedDict``; the subclass's own attributes (yacs' immutability flags)
    end up in that object's ``__dict__``, where nothing reads them.
    """

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _history_buffer_class() -> type:
    module = sys.modules.get('mmengine.logging.history_buffer')
    return module.HistoryBuffer if module is not None else InertObject


def _safe_getattr(owner: Any, name: str) -> Any:
    """``getattr`` as pickle uses it for methods, limited to the statistics methods of mmengine's HistoryBuffer.

    mmengine pickles ``HistoryBuffer._statistics_methods`` as ``getattr(HistoryBuffer, 'min')`` etc.
    """
    history_buffer = _history_buffer_class()
    if owner is history_buffer and not name.startswith('_'):
        if history_buffer is InertObject:
            return f'HistoryBuffer.{name}'
        if callable(vars(history_buffer).get(name)):
            return getattr(history_buffer, name)
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr({getattr(owner, "__qualname__", owner)}, {name!r}) '
        f'was not an allowed global by default.')


def allowed_globals() -> List[Tuple[Any, str]]:
    """The classes and functions a checkpoint file may name, beyond torch's own (tensors, dtypes, OrderedDict).

    ``(object, "module.Name")`` pairs: the name as it appears in the pickle, and what it loads as.
    """
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    allowed = [
        (np.ndarray, 'numpy.ndarray'),
        (np.dtype, 'numpy.dtype'),
        (argparse.Namespace, 'argparse.Namespace'),
        (_MappingAsOrderedDict, 'yacs.config.CfgNode'),
        (_MappingAsOrderedDict, 'mmengine.config.config.ConfigDict'),
        (_history_buffer_class(), 'mmengine.logging.history_buffer.HistoryBuffer'),
        (_safe_getattr, 'builtins.getattr'),
    ]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):  # files written with numpy 1.x / 2.x
        allowed += [(multiarray._reconstruct, f'{module}._reconstruct'), (multiarray.scalar, f'{module}.scalar')]
    # dtype instances are rebuilt through their class (numpy.dtypes.Float64DType, ...)
    allowed += [(cls, f'numpy.dtypes.{cls.__name__}') for cls in vars(np.dtypes).values()
                if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return allowed


# ------------------------------------------------------------------------------------------------ reading files


def _describe(source: PathOrFile) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else repr(getattr(source, 'name', source))


def _python3_name(name: str) -> str:
    # protocol-2 pickles written by Python 3 carry Python 2 names ('commands.Popen' for subprocess.Popen)
    module, _, attr = name.rpartition('.')
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    return f'{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}'


def _refused_globals(source: PathOrFile, error: Exception) -> List[str]:
    """Every global of the file outside the allow-list (zip checkpoints), else the one torch stopped at."""
    names: List[str] = []
    try:
        if hasattr(source, 'seek'):
            source.seek(0)
        names = sorted(map(_python3_name, torch.serialization.get_unsafe_globals_in_checkpoint(source)))
    except Exception:  # a legacy (non-zip) file: fall back to the name in torch's message
        pass
    if not names:
        match = re.search(r'GLOBAL (\S+(?:\(.*?\))?)', str(error))
        if match:
            name = match[1]
            names = [_python3_name(name) if '.' in name.split('(')[0] else f'builtins.{name}']
    return names


_UNSAFE_PATTERNS = ('GLOBAL ', 'unrecognized function', 'Can only build', 'Can only create new object')


def load_checkpoint_file(source: PathOrFile, map_location: Any = 'cpu') -> Any:
    """Load a checkpoint (``.pth``/``.pt``/``.bin`` pickle or ``.safetensors``) from a path or a binary file object.

    Unpickles with ``torch.load(weights_only=True)`` and the allow-list of :func:`allowed_globals`; never runs code
    from the file.

    Raises:
        UnsafeCheckpointError: the file names a global outside the allow-list (the message names it).
        CheckpointError: the file is missing, or corrupt / truncated.
    """
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        if not os.path.isfile(source):
            raise CheckpointError(
                f'Checkpoint file not found: {source!r}. Check the path (it is resolved relative to '
                f'{os.getcwd()!r}), or download the original weights from the link in the model\'s pretrained_cfg.')
        if source.endswith('.safetensors'):
            from safetensors.torch import load_file
            try:
                return load_file(source, device=str(map_location) if isinstance(map_location, str) else 'cpu')
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f'Cannot read safetensors file {source!r} ({e}); it is corrupt or truncated: '
                                      f're-download or re-convert it.') from e
    extra = [g for g in allowed_globals() if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(extra):
        try:
            return torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            if not any(p in str(e) for p in _UNSAFE_PATTERNS):
                raise _corrupt(source, e) from e
            refused = _refused_globals(source, e) or [str(e).splitlines()[0]]
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise _corrupt(source, e) from e
    raise UnsafeCheckpointError(
        f'Refusing to load {_describe(source)}: its pickle names {", ".join(refused)}, which is not tensor data '
        f'and could run code when unpickled. The file is not loaded. Only tensors, plain Python data, numpy '
        f'arrays, argparse.Namespace, yacs CfgNode and mmengine log buffers are read. If you trust the file, '
        f'load it yourself and re-save its tensors (e.g. as safetensors); otherwise get the weights from the '
        f'official release.')


def _corrupt(source: PathOrFile, error: Exception) -> CheckpointError:
    size = f' ({os.path.getsize(source)} bytes)' if isinstance(source, str) else ''
    return CheckpointError(
        f'Cannot read checkpoint {_describe(source)}{size}: {type(error).__name__}: {error}. The file is corrupt '
        f'or truncated (an interrupted download?); download it again and compare its size/hash with the release.')


# ------------------------------------------------------------------------------------------------ downloads


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(('http://', 'https://'))


def _cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    # timm's and torch.hub's url cache: $TORCH_HOME/hub/checkpoints/<file name>
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    return os.path.join(os.fspath(cache_dir), os.path.basename(urllib.parse.urlparse(url).path))


def download_cached(url: str, cache_dir: Optional[str] = None, progress: bool = True, timeout: float = 60.) -> str:
    """Download ``url`` into the torch hub cache (``$TORCH_HOME/hub/checkpoints``, or ``cache_dir``) once.

    Returns the cached file's path; an existing file is reused without a request. The body streams into a
    ``.partial`` file that replaces the cache file only once it has the announced length (torch.hub's downloader
    would cache a body cut short by a dropped connection).

    Raises:
        DownloadError: HTTP error (404, ...), network failure, or a truncated download; nothing is cached then.
    """
    path = _cache_path(url, cache_dir)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + '.partial'
    manual = (f'Or download it yourself (browser, curl -L -o {path!r} {url}) and pass the local path, e.g. '
              f'pretrained_cfg_overlay=dict(file=PATH).')
    _logger.info(f'Downloading {url} to {path}')
    received, expected = 0, None
    try:
        request = urllib.request.Request(url, headers={'User-Agent': 'lesa-lit-models'})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, 'wb') as f:
            length = response.headers.get('Content-Length')
            expected = int(length) if length is not None else None
            from tqdm.auto import tqdm
            with tqdm(total=expected, disable=not progress, unit='B', unit_scale=True, unit_divisor=1024,
                      desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        _remove(partial)
        raise DownloadError(
            f'Downloading {url} failed: HTTP {e.code} {e.reason}. The server has no file at this address: check '
            f'the URL (release tag and file name). {manual}') from e
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout, OSError) as e:
        _remove(partial)
        reason = getattr(e, 'reason', e)
        raise DownloadError(
            f'Downloading {url} failed after {received} bytes: {type(e).__name__}: {reason}. Check the network '
            f'connection (and HTTPS_PROXY behind a proxy), then run again. {manual}') from e
    if expected is not None and received != expected:
        _remove(partial)
        raise DownloadError(
            f'Download of {url} is truncated: received {received} of {expected} bytes (the connection closed '
            f'early). Nothing was cached (the partial file is deleted); run again to retry. {manual}')
    os.replace(partial, path)
    return path


def _remove(path: str):
    if os.path.exists(path):
        os.remove(path)


def load_checkpoint(source: Union[PathOrFile], map_location: Any = 'cpu', cache_dir: Optional[str] = None,
                    progress: bool = True) -> Any:
    """Load a checkpoint from a local path, a binary file object, or an http(s) URL (cached, see
    :func:`download_cached`), through :func:`load_checkpoint_file`."""
    if not _is_url(source):
        return load_checkpoint_file(source, map_location)
    path = download_cached(source, cache_dir, progress)
    try:
        return load_checkpoint_file(path, map_location)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointError(
            f'{e}\nThe file was downloaded from {source}: delete {path!r} and run again to download it anew.') from e


def register_mmengine_loader() -> None:
    """Make mmengine's ``CheckpointLoader`` (``load_checkpoint``, ``Runner.load_checkpoint`` / ``resume``,
    ``init_cfg=dict(type='Pretrained')``) read local paths and http(s) URLs through :func:`load_checkpoint`."""
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_local(filename: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(os.path.expanduser(filename), map_location)

    def load_url(filename: str, map_location: Any = None, model_dir: Optional[str] = None,
                 progress: bool = True) -> Any:
        return load_checkpoint(filename, map_location, cache_dir=model_dir, progress=progress)

    CheckpointLoader.register_scheme(prefixes='', loader=load_local, force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_url, force=True)


# ------------------------------------------------------------------------------------------------ state dicts


def unwrap_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside a training checkpoint, without a DDP ``module.`` prefix."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'Expected a checkpoint dict, got {type(checkpoint).__name__}.')
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(
            f'No tensors found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]}); expected a state '
            f'dict, optionally wrapped in one of {_WRAPPER_KEYS}.')
    return dict(clean_state_dict(state_dict))


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str, keep_others: bool = True) -> Dict[str, torch.Tensor]:
    """Remove ``prefix`` from keys that carry it; drop the other keys unless ``keep_others``."""
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {
        (k[len(prefix):] if k.startswith(prefix) else k): v
        for k, v in state_dict.items() if keep_others or k.startswith(prefix)
    }


def verify_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        ignore_shape_of: Iterable[str] = (),
        max_listed: int = 8,
) -> Dict[str, torch.Tensor]:
    """Check that ``state_dict`` fits ``model`` key for key and shape for shape; return it unchanged.

    ``ignore_shape_of`` names key prefixes whose shapes timm adapts after filtering (the classifier
    when ``num_classes`` differs, the first conv when ``in_chans`` differs).
    Raises :class:`CheckpointError` listing missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    ignore_shape_of = tuple(ignore_shape_of)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape and not k.startswith(ignore_shape_of)
    ]
    if missing or unexpected or mismatched:
        def listing(title, items):
            if not items:
                return ''
            more = f' ... and {len(items) - max_listed} more' if len(items) > max_listed else ''
            return f'\n  {len(items)} {title}: ' + ', '.join(items[:max_listed]) + more
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise CheckpointError(
            f'Checkpoint does not match architecture {name!r}:'
            + listing('missing keys', missing) + listing('unexpected keys', unexpected)
            + listing('shape mismatches', mismatched)
            + '\n  Is this a checkpoint of another model or size? Pick the model name that matches the file.')
    return state_dict


def resolve_pretrained_file(pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Read ``pretrained_cfg_overlay['file']`` ourselves and hand timm the tensors as ``state_dict``."""
    overlay: Optional[Dict[str, Any]] = kwargs.get('pretrained_cfg_overlay')
    if pretrained and overlay and overlay.get('file') and overlay.get('state_dict') is None:
        overlay = dict(overlay)
        overlay['state_dict'] = load_checkpoint_file(overlay.pop('file'))
        kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
    return kwargs
