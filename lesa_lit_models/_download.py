"""Release downloads: fetched once into the torch hub cache, shared by processes that ask at once, never cached
when cut short; then read by the safe loader (:func:`load_checkpoint`)."""
import http.client
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import Any, Optional

import torch
from filelock import FileLock, Timeout

from ._safe_load import CheckpointError, PathOrFile, UnsafeCheckpointError, load_checkpoint_file

__all__ = ['DownloadError', 'is_url', 'download_cached', 'load_checkpoint']

_logger = logging.getLogger(__name__)


class DownloadError(CheckpointError):
    """A release file could not be downloaded completely."""


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
