"""The one safe checkpoint reader: ``torch.load(weights_only=True)`` with an explicit allow-list.

Every entry point of the package (``pretrained=True`` downloads, ``pretrained_cfg_overlay=dict(file=...)``,
``lesa-lit-convert``, ``hubconf.py``, and mmengine's ``CheckpointLoader`` in the detection adapter) reads files
through :func:`load_checkpoint_file`. Tensors and plain Python data load, and a file may name only the classes
and functions of :func:`allowed_globals`, the ones the authors' release files and mmengine's own checkpoints
need. Nothing a file names is imported, and a file that names anything else (``os.system``, ``builtins.eval``,
``subprocess.Popen``, ...) is refused with :class:`UnsafeCheckpointError` before it can run.

What the authors' files carry besides tensors, and what it becomes here:

* numpy arrays, scalars and dtypes (mmdet 2.x ``meta``, mmengine ``message_hub``): real numpy objects;
* ``argparse.Namespace`` (LIT-Ti's ``args``, DeiT code): a real ``Namespace``;
* ``yacs.config.CfgNode`` (LIT-S/M/B's ``config``, Swin code) and mmengine's ``ConfigDict``: an ``OrderedDict``
  of their items (yacs need not be installed);
* mmengine's ``HistoryBuffer`` (``message_hub``): the real class when mmengine's logging is loaded (a training
  run that resumes), otherwise an :class:`InertObject` holding the same attributes.
"""
import _compat_pickle
import argparse
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from typing import IO, Any, List, Tuple, Union

import numpy as np
import torch

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'InertObject', 'PathOrFile', 'allowed_globals',
    'load_checkpoint_file',
]

PathOrFile = Union[str, os.PathLike, IO[bytes]]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or belongs to another architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names code outside the allow-list (it could run it when unpickled); it is not loaded."""


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
