#!/usr/bin/env python3
"""Mock OAuth2 token endpoint for the benchmark (loopback only).

POST /token/<lifetime_seconds>  -> {"access_token": <random>, "token_type": "Bearer",
                                    "expires_in": <lifetime_seconds>}; token_type "DPoP" when
                                    the request carries a DPoP proof (as a provider binding
                                    the token would; the proof is not checked)
GET  /count                     -> {"total": N, "by_path": {"/token/60": n, ...}}

It is hit once per token lifetime, so its speed does not matter; it only counts.
Usage: token_endpoint.py PORT   (binds 127.0.0.1:PORT, prints "ready" when listening)
"""
import json
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
COUNTS = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 2 or parts[0] != "token" or not parts[1].isdigit():
            self._send(404, {"error": "not_found"})
            return
        with LOCK:
            COUNTS[self.path] = COUNTS.get(self.path, 0) + 1
        self._send(200, {
            "access_token": secrets.token_urlsafe(32),
            "token_type": "DPoP" if self.headers.get("DPoP") else "Bearer",
            "expires_in": int(parts[1]),
        })

    def do_GET(self):
        if self.path == "/count":
            with LOCK:
                self._send(200, {"total": sum(COUNTS.values()), "by_path": dict(COUNTS)})
        else:
            self._send(404, {"error": "not_found"})


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
