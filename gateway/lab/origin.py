"""The lab's origin app: a tiny HTTP server that says which simulated CVM answered.

``GET /<anything>`` returns ``200`` with JSON ``{"instance": NAME, "path": PATH,
"client": IP}``; ``/big?bytes=N`` returns N bytes (at most 64 MiB) for transfer tests. It writes
``--ready-file`` once listening, so a harness outside the namespace can wait for it.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_handler(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/big":
                query = urllib.parse.parse_qs(url.query)
                size = min(int(query.get("bytes", ["0"])[0] or 0), 64 * 1024 * 1024)
                body = b"x" * size
                ctype = "application/octet-stream"
            else:
                info = {"instance": name, "path": self.path, "client": self.client_address[0]}
                body = json.dumps(info).encode()
                ctype = "application/json"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.name))
    server.daemon_threads = True
    if args.ready_file is not None:
        args.ready_file.write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
