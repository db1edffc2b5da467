"""Python's `websockets` against the running narration example.

Two clients at once: one streams a whole narration (with permessage-deflate
negotiated) and closes cleanly; the
other completes the handshake by hand and then sends garbage (a frame with
reserved bits set), and must be closed with 1002 while the first goes on.

Usage: python narration.py http://127.0.0.1:PORT
"""
import asyncio
import base64
import json
import os
import sys
import urllib.request

import websockets

BASE = sys.argv[1]
HOST, PORT = BASE.removeprefix("http://").split(":")


def search(query):
    request = urllib.request.Request(
        BASE + "/api/search",
        data=json.dumps({"query": query}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["requestId"]


async def narration():
    request_id = search("sushi")
    text, full_text = "", None
    async with websockets.connect(BASE.replace("http", "ws") + "/ws") as ws:
        extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        await ws.send(json.dumps({"type": "subscribe", "requestId": request_id}))
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "stream.delta":
                text += msg["text"]
            elif msg["type"] == "stream.done":
                full_text = msg["fullText"]
            elif msg["type"] == "status" and msg["status"] == "done":
                break
    return text, full_text, ws.close_code, extensions


async def garbage():
    reader, writer = await asyncio.open_connection(HOST, int(PORT))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.write(b"\xf1\x85" + os.urandom(9))  # RSV bits set, masked, 5 bytes
    await writer.drain()
    frame = await asyncio.wait_for(reader.readexactly(4), 10)
    writer.close()
    return frame[0] & 0x0F, int.from_bytes(frame[2:4], "big")


async def main():
    (text, full_text, code, extensions), (opcode, close_code) = await asyncio.wait_for(
        asyncio.gather(narration(), garbage()), 30
    )
    print(
        f"python websockets: {len(text)} chars streamed, matches fullText: {text == full_text}, "
        f"close {code}, extensions: {extensions!r}"
    )
    print(f"python garbage client: opcode {opcode:#x}, close code {close_code}")
    ok = (
        text == full_text
        and full_text
        and code == 1000
        and extensions.startswith("permessage-deflate")
        and opcode == 0x8
        and close_code == 1002
    )
    print("python check: ok" if ok else "python check: FAILED")
    sys.exit(0 if ok else 1)


asyncio.run(main())
