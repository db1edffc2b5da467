"""Bytes a whole narration takes on the wire, with and without
permessage-deflate, against a running narration example.

Each run posts a search, opens a raw WebSocket (offering
`permessage-deflate; client_max_window_bits` as browsers do, or nothing),
subscribes, and counts the bytes the server sends after the handshake until
the `status` `done` message (short, so never compressed) has come.

Usage: python3 bench/narration_bytes.py http://127.0.0.1:PORT [runs=5]
"""
import base64
import json
import os
import socket
import statistics
import sys
import urllib.request

BASE = sys.argv[1]
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
HOST, PORT = BASE.removeprefix("http://").split(":")
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def search():
    request = urllib.request.Request(
        BASE + "/api/search",
        data=json.dumps({"query": "pizza"}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["requestId"]


def masked_text(payload):
    mask = os.urandom(4)
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


def narration_bytes(deflate):
    request_id = search()
    sock = socket.create_connection((HOST, int(PORT)), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
            f"{OFFER if deflate else ''}\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, data = data.split(b"\r\n\r\n", 1)
    negotiated = b"permessage-deflate" in head
    assert negotiated == deflate, head
    sock.sendall(masked_text(json.dumps({"type": "subscribe", "requestId": request_id}).encode()))
    while b'"status":"done"' not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed early"
        data += chunk
    sock.close()
    return len(data)


for deflate in (False, True):
    sizes = [narration_bytes(deflate) for _ in range(RUNS)]
    label = "with permessage-deflate" if deflate else "without"
    print(f"{label}: median {statistics.median(sizes)} bytes (runs: {sizes})")
