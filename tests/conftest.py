"""Shared fixtures: a loopback HTTP server that plays a release site, with the download caches in a temp dir."""
import http.server
import threading

import pytest


class ReleaseServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; records every request path in ``requests``.

    ``truncate[path] = n`` announces the full Content-Length but sends only the first ``n`` bytes, then closes
    the connection (an interrupted download). Unknown paths get HTTP 404.
    """

    def __init__(self):
        self.files, self.truncate, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, 'Not Found')
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'application/octet-stream')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body[:server.truncate.get(self.path, len(body))])
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
def release_server(tmp_path, monkeypatch):
    """A :class:`ReleaseServer`, with TORCH_HOME (the torch hub download cache) and HF_HOME in ``tmp_path``."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    server = ReleaseServer()
    yield server
    server.close()
