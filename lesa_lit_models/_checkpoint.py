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

Families' ``checkpoint_filter_fn`` then map keys and resample tables, and timm's ``load_pretrained`` adapts the
result (classifier, input channels) and loads it; :func:`strict_filter` checks what timm finally loads with
:func:`verify_state_dict`, the one strict check of weights.
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
from contextlib import contextmanager
from functools import wraps
from typing import IO, Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import numpy as np
import torch
import torch.nn as nn
from filelock import FileLock, Timeout
from timm.models import build_model_with_cfg, clean_state_dict, resolve_pretrained_cfg

from ._timm import _resolve_pretrained_source

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'DownloadError', 'InertObject', 'allowed_globals',
    'load_checkpoint_file', 'load_checkpoint', 'download_cached', 'is_url', 'register_mmengine_loader',
    'unwrap_state_dict', 'strip_prefix', 'backbone_state_dict', 'verify_state_dict', 'strict_filter',
    'release_file_note', 'resolve_pretrained_weights', 'release_loaded_weights', 'build_model_with_weights',
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
    created for the subclass is an ``OrderedDict``. yacs' items arrive after it is created, mmengine's as a dict
    passed to the constructor (``ConfigDict(dict)``). The subclass's own attributes (yacs' immutability flags)
    end up in the object's ``__dict__``, where nothing reads them.
    """

    def __new__(cls, items=None):
        return OrderedDict(items if isinstance(items, dict) else ())


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
        f'Unsupported global: GLOBAL builtins.getattr({getattr(owner, "__qualname__", type(owner).__name__)}.{name}) '
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
    # dtype instances are rebuilt through their class (numpy.dtypes.Float64DType, ...; numpy >= 1.25)
    allowed += [(cls, f'numpy.dtypes.{cls.__name__}') for cls in vars(getattr(np, 'dtypes', object)).values()
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
    except Exception:  # a legacy (non-zip) file, or opcodes the scan does not read: use torch's message
        pass
    match = re.search(r'GLOBAL (\S+(?:\(.*?\))?)', str(error))
    if not names and match:
        name = match[1]
        names = [_python3_name(name) if '.' in name.split('(')[0] else f'builtins.{name}']
    if not names and any(p in str(error) for p in ('unrecognized function', 'Can only build', 'Can only create')):
        names = [_unpickler_error(error)]
    return names


def _unpickler_error(error: Exception) -> str:
    # torch wraps the restricted unpickler's own message in advice to switch safety off; keep only the former
    message = str(error)
    if 'WeightsUnpickler error: ' in message:
        message = message.rsplit('WeightsUnpickler error: ', 1)[-1].strip().splitlines()[0]
    return message


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
    _check_torch_save_header(source)
    extra = [g for g in allowed_globals() if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(extra):
        try:
            return torch.load(source, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            refused = _refused_globals(source, e)
            if not refused:
                raise _corrupt(source, e) from e
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise _corrupt(source, e) from e
    raise UnsafeCheckpointError(
        f'Refusing to load {_describe(source)}: its pickle names {", ".join(refused)}, which is not tensor data '
        f'and could run code when unpickled. The file is not loaded. Only tensors, plain Python data, numpy '
        f'arrays, argparse.Namespace, yacs CfgNode and mmengine log buffers are read. If you trust the file, '
        f'load it yourself and re-save its tensors (e.g. as safetensors); otherwise get the weights from the '
        f'official release.')


_ZIP_HEADER = b'PK\x03\x04'  # torch.save's format since torch 1.6
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c.to_bytes(10, 'little')  # pickled first by torch.save's legacy format


def _check_torch_save_header(source: PathOrFile):
    """Raise :class:`CheckpointError` if the file's first bytes are not those of a ``torch.save`` file."""
    if isinstance(source, str):
        with open(source, 'rb') as f:
            head = f.read(32)
    elif hasattr(source, 'seekable') and source.seekable():
        start = source.tell()
        head = source.read(32)
        source.seek(start)
    else:
        return
    if head.startswith(_ZIP_HEADER) or _LEGACY_MAGIC in head[:16]:
        return
    if not head:
        what = 'it is empty'
    elif head.lstrip()[:1] == b'<':
        what = 'it is a web page or other markup (a sign-in or error page saved instead of the file?)'
    elif len(head) > 9 and head[8:10] == b'{"':
        what = 'it is a safetensors file: give it the .safetensors extension'
    else:
        what = f'it begins with the bytes {head[:8].hex(" ")}'
    raise CheckpointError(
        f'{_describe(source)} is not a checkpoint: {what}. Checkpoints are files written by torch.save (they '
        f'begin with a zip header or torch\'s legacy header) or .safetensors files. Check that the path names the '
        f'weights file, or download it again from the release.')


def _corrupt(source: PathOrFile, error: Exception) -> CheckpointError:
    size = f' ({os.path.getsize(source)} bytes)' if isinstance(source, str) else ''
    if 'Unsupported operand' in str(error):
        return CheckpointError(
            f'Cannot read checkpoint {_describe(source)}{size} safely: {_unpickler_error(error)}. The safe loader '
            f'reads files written by torch.save with its default pickle protocol 2; this one uses other pickle '
            f'instructions (torch.save(..., pickle_protocol=4 or 5)), or it is corrupt. Download it again, or re-save '
            f'its tensors with the default protocol (or as safetensors) where you trust it.')
    return CheckpointError(
        f'Cannot read checkpoint {_describe(source)}{size}: {type(error).__name__}: {_unpickler_error(error)}. The '
        f'file is corrupt or truncated (an interrupted download?); download it again and compare its size/hash '
        f'with the release.')


# ------------------------------------------------------------------------------------------------ downloads


def is_url(source: Any) -> bool:
    """Whether ``source`` is an http(s) URL (downloaded by :func:`load_checkpoint`) rather than a local path."""
    return isinstance(source, str) and source.startswith(('http://', 'https://'))


def _cache_path(url: str, cache_dir: Optional[str] = None) -> str:
    # timm's and torch.hub's url cache: $TORCH_HOME/hub/checkpoints/<file name>
    cache_dir = cache_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    return os.path.join(os.fspath(cache_dir), os.path.basename(urllib.parse.urlparse(url).path))


def download_cached(url: str, cache_dir: Optional[str] = None, progress: bool = True, timeout: float = 60.) -> str:
    """Download ``url`` into the torch hub cache (``$TORCH_HOME/hub/checkpoints``, or ``cache_dir``) once.

    Returns the cached file's path; an existing file is reused without a request. Processes that ask for the same
    file at once (torchrun ranks, notebooks) take turns on a lock file beside it: the first downloads, the others
    wait and then read what it cached. The body streams into a ``.partial`` file that replaces the cache file only
    once it has the announced length, so a download cut short (dropped connection, killed process) is never taken
    for the file.

    Raises:
        DownloadError: HTTP error (404, ...), network failure, or a truncated download; nothing is cached then.
    """
    path = _cache_path(url, cache_dir)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _download_lock(path):
        if not os.path.isfile(path):  # another process may have cached it while this one waited
            _download(url, path, progress, timeout)
    return path


@contextmanager
def _download_lock(path: str):
    """Hold ``path.lock`` (released by the OS if the holder dies), saying once why this process waits for it."""
    lock = FileLock(path + '.lock')
    try:
        lock.acquire(timeout=1)
    except Timeout:
        _logger.warning(f'Waiting for another process that is downloading {path} (it holds {lock.lock_file}).')
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _download(url: str, path: str, progress: bool, timeout: float):
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


def _remove(path: str):
    if os.path.exists(path):
        os.remove(path)


def load_checkpoint(source: PathOrFile, map_location: Any = 'cpu', cache_dir: Optional[str] = None,
                    progress: bool = True) -> Any:
    """Load a checkpoint from a local path, a binary file object, or an http(s) URL (cached, see
    :func:`download_cached`), through :func:`load_checkpoint_file`."""
    if not is_url(source):
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
    from mmengine.dist import get_dist_info
    from mmengine.runner.checkpoint import CheckpointLoader

    # mmengine logs a loader as "Loads checkpoint by <name[10:]> backend": the names follow its own
    def load_from_local(filename: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(os.path.expanduser(filename), map_location)

    def load_from_http(filename: str, map_location: Any = None, model_dir: Optional[str] = None,
                       progress: bool = True) -> Any:
        # as mmengine's own: rank 0 downloads into the cache first, the other ranks then read the cached file
        rank, world_size = get_dist_info()
        if rank == 0:
            checkpoint = load_checkpoint(filename, map_location, cache_dir=model_dir, progress=progress)
        if world_size > 1:
            torch.distributed.barrier()
            if rank > 0:
                checkpoint = load_checkpoint(filename, map_location, cache_dir=model_dir, progress=False)
        return checkpoint

    # mmengine registers its own loaders for these prefixes: replacing them needs force
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_from_http, force=True)


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


def backbone_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint (:func:`unwrap_state_dict`); of an mmdet detector only its ``backbone.*`` ones,
    without the prefix."""
    return strip_prefix(unwrap_state_dict(checkpoint), 'backbone.', keep_others=False)


def verify_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        ignore_shape_of: Iterable[str] = (),
        may_miss: Iterable[str] = (),
        max_listed: int = 8,
) -> Dict[str, torch.Tensor]:
    """Check that ``state_dict`` fits ``model`` key for key and shape for shape; return it unchanged.

    ``ignore_shape_of`` names key prefixes whose shapes are not checked, ``may_miss`` keys that may be absent.
    Raises :class:`CheckpointError` listing missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    ignore_shape_of, may_miss = tuple(ignore_shape_of), set(may_miss)
    missing = [k for k in expected if k not in state_dict and k not in may_miss]
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
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
        raise CheckpointError(
            f'Checkpoint does not match architecture {name!r}:'
            + listing('missing keys', missing) + listing('unexpected keys', unexpected)
            + listing('shape mismatches', mismatched)
            + '\n  Is this a checkpoint of another model or size? Pick the model name that matches the file.')
    return state_dict


FilterFn = Callable[[Dict[str, Any], nn.Module], Dict[str, torch.Tensor]]


def strict_filter(filter_fn: FilterFn) -> FilterFn:
    """``filter_fn`` for timm's ``load_pretrained``, followed by :func:`verify_state_dict` of what timm then loads.

    timm adapts the filtered weights (drops a classifier of other classes, adapts the stem to ``in_chans``) and
    loads them strictly, with torch's terse error; the check runs at that load (a ``load_state_dict`` pre-hook), on
    timm's result: keys timm dropped may be missing, anything else that does not fit is a :class:`CheckpointError`
    that lists it.
    """
    @wraps(filter_fn)
    def filter_and_check(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        state_dict = filter_fn(state_dict, model)
        filtered_keys = set(state_dict)

        def check(module, loaded, prefix, *args):
            hook.remove()
            verify_state_dict(loaded, module, may_miss=filtered_keys - loaded.keys())

        hook = model.register_load_state_dict_pre_hook(check)
        return state_dict

    return filter_and_check


# ------------------------------------------------------------------------------------------------ timm models

_RELEASE_FILE_NOTE = 'Release file:'


def release_file_note(text: str) -> str:
    """A pretrained cfg note that tells where to get weights that have no direct download (shown by the error)."""
    return f'{_RELEASE_FILE_NOTE} {text}'


def resolve_pretrained_weights(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Read a model's pretrained ``file`` or ``url`` with the safe loader; hand timm the contents as ``state_dict``.

    Called by each family's ``_create_*`` before ``build_model_with_cfg``, with the kwargs ``timm.create_model``
    passed (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``). The source is resolved as timm does
    (overlay ``state_dict`` > ``file`` > ``url``): a ``file`` is read from disk, a ``url`` downloaded once into the
    torch hub cache (or ``cache_dir``) with a progress bar (the releases are 80-350 MB). ``hf-hub:`` and
    ``local-dir:`` sources stay with timm (safetensors, or ``weights_only`` loading). The family's
    ``checkpoint_filter_fn`` then converts the raw checkpoint.

    Raises:
        CheckpointError: ``pretrained=True`` and the pretrained cfg names no weights that can be fetched (the
            message says where the authors publish them and how to use the downloaded file); nothing is fetched.
    """
    if not pretrained:
        return kwargs
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    load_from, location = _resolve_pretrained_source(cfg)
    if load_from == 'file':
        checkpoint = load_checkpoint_file(location)
    elif load_from == 'url':
        checkpoint = load_checkpoint(location, cache_dir=kwargs.get('cache_dir'))  # with a progress bar
    elif load_from == '':
        raise CheckpointError(_no_weights_message(variant, cfg))
    else:  # state_dict already in memory, hf-hub, local-dir
        return kwargs
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=checkpoint)
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _no_weights_message(variant: str, cfg: Dict[str, Any]) -> str:
    name = '.'.join(filter(None, (cfg.get('architecture') or variant, cfg.get('tag'))))
    where = [n[len(_RELEASE_FILE_NOTE):].strip() for n in cfg.get('notes') or () if n.startswith(_RELEASE_FILE_NOTE)]
    source = f'The authors publish them at {cfg["origin_url"]}' if cfg.get('origin_url') else 'No source is known'
    return (
        f'{name} has no weights that can be downloaded automatically (no url or hf_hub_id in its pretrained cfg). '
        f'{source}' + (f': {where[0]}' if where else '.') + '\n'
        f'Download the file by hand, then either load it directly:\n'
        f"    timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/file.pth'))\n"
        f'or convert it once and load the converted copy:\n'
        f'    lesa-lit-convert {name} /path/to/file.pth OUT_DIR\n'
        f"    timm.create_model('local-dir:OUT_DIR', pretrained=True)")


def build_model_with_weights(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: FilterFn,
        kwargs_for_checkpoint: Optional[Callable[[Dict[str, Any], Dict[str, Any]], Dict[str, Any]]] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a family of this package: the pretrained weights are read by
    :func:`resolve_pretrained_weights`, converted by ``filter_fn`` and checked by :func:`strict_filter`, and the
    model keeps no reference to the file (:func:`release_loaded_weights`).

    ``kwargs_for_checkpoint(checkpoint, kwargs)`` returns the model kwargs for a checkpoint that was read (e.g. a
    layout the checkpoint needs), before the model is built.
    """
    kwargs = resolve_pretrained_weights(variant, pretrained, kwargs)
    checkpoint = (kwargs.get('pretrained_cfg_overlay') or {}).get('state_dict')
    if pretrained and checkpoint is not None and kwargs_for_checkpoint is not None:
        kwargs = kwargs_for_checkpoint(checkpoint, kwargs)
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=strict_filter(filter_fn),
                                 **kwargs)
    return release_loaded_weights(model)


def release_loaded_weights(model: nn.Module) -> nn.Module:
    """Drop the checkpoint that :func:`resolve_pretrained_weights` put into the model's ``pretrained_cfg``.

    timm keeps the overlay's ``state_dict`` in ``model.pretrained_cfg``; without this the whole file (optimizer
    state included) would stay in memory as long as the model.
    """
    for module in model.modules():
        cfg = getattr(module, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)
    return model
