"""Shared fixtures: a loopback HTTP server that plays a release site, with the download caches in a temp dir; an
offline Hugging Face cache; a small synthetic COCO dataset; the tensors autograd keeps for backward. Plain helpers
are in _helpers.py.

torch.compile's C++ kernels (tests/test_compile_export.py) are slow to build: they are kept across runs and clones
in the project's cache outside the repository, beside the mmcv wheel (``LESA_LIT_CACHE``, default
``~/.cache/lesa-lit-models``), unless ``TORCHINDUCTOR_CACHE_DIR`` names another place.
"""
import contextlib
import http.server
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

# under pytest-xdist (make test: one worker per core), each worker and the processes its tests start get their
# share of the cores, so that workers do not oversubscribe them
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ['OMP_NUM_THREADS'] = str(_THREADS)
    os.environ.setdefault('TORCHINDUCTOR_COMPILE_THREADS', str(_THREADS))

os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', os.path.join(
    os.environ.get('LESA_LIT_CACHE', os.path.expanduser('~/.cache/lesa-lit-models')), 'torchinductor'))


class ReleaseServer:
    """Serves ``files`` (URL path -> bytes) and the files written into the folder ``root`` (``/name`` is
    ``root / name``) on 127.0.0.1; records every request path in ``requests``.

    ``truncate[path] = n`` announces the full Content-Length but sends only the first ``n`` bytes, then closes
    the connection (an interrupted download). ``seconds[path] = s`` spreads the body over ``s`` seconds (a slow
    link). Unknown paths get HTTP 404.
    """

    def __init__(self, root: Path):
        self.files, self.truncate, self.seconds, self.requests, self.root = {}, {}, {}, [], root
        root.mkdir(parents=True, exist_ok=True)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                on_disk = server.root / self.path.lstrip('/')
                if body is None and on_disk.is_file():
                    body = on_disk.read_bytes()
                if body is None:
                    self.send_error(404, 'Not Found')
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'application/octet-stream')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                body = body[:server.truncate.get(self.path, len(body))]
                pieces = 20 if self.path in server.seconds else 1
                try:
                    for i in range(pieces):
                        self.wfile.write(body[i * len(body) // pieces:(i + 1) * len(body) // pieces])
                        self.wfile.flush()
                        time.sleep(server.seconds.get(self.path, 0) / pieces)
                except (BrokenPipeError, ConnectionResetError):  # the client went away (a killed download)
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.httpd.server_address[1]}{path}'

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub_caches(tmp_path, monkeypatch):
    """TORCH_HOME (the torch hub download cache) and HF_HOME in ``tmp_path``, for this process and its children."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))


@pytest.fixture
def release_server(tmp_path, hub_caches):
    """A :class:`ReleaseServer` serving ``tmp_path / 'www'``, with the download caches in ``tmp_path``."""
    server = ReleaseServer(tmp_path / 'www')
    yield server
    server.close()


@pytest.fixture
def saved_for_backward():
    """``with saved_for_backward() as saved:`` lists in ``saved`` every tensor autograd keeps for the backward of
    what runs inside (through saved-tensor hooks)."""
    @contextlib.contextmanager
    def collect():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            yield saved
    return collect


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache in offline mode (the real hub code path):
    ``add(repo_id, files)`` puts a snapshot in it, ``files`` a folder to copy or a state dict to write as
    ``model.safetensors``."""
    import huggingface_hub.constants as hf_constants
    import safetensors.torch
    cache, commit = tmp_path / 'hf_cache', '0123456789abcdef0123456789abcdef01234567'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)  # constants are read at import time
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))

    def add(repo_id, files):
        repo = cache / ('models--' + repo_id.replace('/', '--'))
        (repo / 'refs').mkdir(parents=True)
        (repo / 'refs' / 'main').write_text(commit)  # no trailing newline, or the lookup fails
        snapshot = repo / 'snapshots' / commit
        if isinstance(files, Mapping):
            snapshot.mkdir(parents=True)
            safetensors.torch.save_file({k: v.contiguous() for k, v in files.items()},
                                        str(snapshot / 'model.safetensors'))
        else:
            shutil.copytree(files, snapshot)
    return add


@pytest.fixture(scope='session')
def coco(tmp_path_factory):
    """A synthetic COCO dataset (train 4, val 2, test-dev 2 images of 96-144 pixels) in the layout mmdet reads."""
    from lesa_lit_det.synthetic import SyntheticCocoSpec, make_synthetic_coco
    from _helpers import COCO_SPEC
    root = tmp_path_factory.mktemp('synthetic') / 'coco'
    make_synthetic_coco(str(root), SyntheticCocoSpec(**COCO_SPEC))
    return root
