#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server's pod endpoints, for tests.

It speaks the real list + watch protocol for `/api/v1/pods`: a list is a
PodList with a resourceVersion; a watch (`watch=true&resourceVersion=N`)
streams the changes after N as JSON watch events over a chunked response,
and a resourceVersion older than the server keeps is answered with a 410
(an ERROR event whose Status has code 410), which makes a client list
again. `fieldSelector=spec.nodeName=NODE` is honoured.

The test drives it through `/test/...`:
  POST /test/pods          body: a Pod; added (or replaced), watchers told
  POST /test/pods?quiet=1  the same, watchers not told (only a list shows it)
  POST /test/expire        open watches end with a 410, and versions up to
                           now are forgotten
  GET  /test/requests      {"list": n, "watch": n}

Usage: apiserver.py PORT (prints "listening" once it is).
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

lock = threading.Condition()
pods = {}  # uid -> pod
events = []  # (resourceVersion, type, pod)
version = 1
oldest = 0  # versions at or below are gone (410)
expired = 0  # generation of /test/expire calls
requests = {"list": 0, "watch": 0}


def node_of(pod):
    return pod.get("spec", {}).get("nodeName", "")


def gone():
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version",
            "reason": "Expired",
            "code": 410,
        },
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        global version, oldest, expired
        url = urlparse(self.path)
        q = parse_qs(url.query)
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length) if length else b""
        if url.path == "/test/pods":
            pod = json.loads(body)
            with lock:
                version += 1
                pod["metadata"]["resourceVersion"] = str(version)
                uid = pod["metadata"]["uid"]
                kind = "MODIFIED" if uid in pods else "ADDED"
                pods[uid] = pod
                if not q.get("quiet"):
                    events.append((version, kind, pod))
                lock.notify_all()
            self.send_json(200, {"resourceVersion": str(version)})
        elif url.path == "/test/expire":
            with lock:
                oldest = version
                expired += 1
                events.clear()
                lock.notify_all()
            self.send_json(200, {})
        else:
            self.send_json(404, {})

    def do_GET(self):
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path == "/test/requests":
            with lock:
                self.send_json(200, dict(requests))
            return
        if url.path != "/api/v1/pods":
            self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "message": "not found", "reason": "NotFound", "code": 404})
            return
        node = ""
        for sel in q.get("fieldSelector", []):
            for part in sel.split(","):
                if part.startswith("spec.nodeName="):
                    node = part.split("=", 1)[1]
        if q.get("watch", ["false"])[0] in ("true", "1"):
            self.watch(node, int(q.get("resourceVersion", ["0"])[0] or 0))
            return
        with lock:
            requests["list"] += 1
            items = [p for p in pods.values() if not node or node_of(p) == node]
            self.send_json(200, {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(version)},
                "items": items,
            })

    def watch(self, node, since):
        with lock:
            requests["watch"] += 1
            generation = expired
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                with lock:
                    if since < oldest or generation != expired:
                        self.chunk(gone())
                        break
                    pending = [e for e in events if e[0] > since]
                    if not pending:
                        lock.wait(timeout=1.0)
                        continue
                for (rv, kind, pod) in pending:
                    since = rv
                    if not node or node_of(pod) == node:
                        self.chunk({"type": kind, "object": pod})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def main():
    port = int(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
