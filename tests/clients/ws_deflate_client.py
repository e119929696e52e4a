"""Python `websockets` with its default permessage-deflate: prints the negotiated
extensions, sends one 2 KB message (compressed by the library), then prints the first
two messages it receives, one per line. Usage: ws_deflate_client.py URL"""
import json
import sys

from websockets.sync.client import connect

with connect(sys.argv[1], open_timeout=10) as ws:
    print("extensions " + ws.response.headers.get("Sec-WebSocket-Extensions", ""), flush=True)
    ws.send(json.dumps({"hello": "x" * 2000}))
    for _ in range(2):
        print("message " + json.dumps(ws.recv(timeout=20)), flush=True)
