#!/usr/bin/env python3
"""A Comet client over raw TCP speaking JSON-lines (docs/PROTOCOL.md); standard library only.

usage: tcp_json_client.py HOST PORT CONN_ID TOKEN [COUNT]
Prints each pushed message on its own line; exits after COUNT messages if given.
"""
import json
import socket
import sys


def main() -> int:
    host, port, conn_id, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    count = int(sys.argv[5]) if len(sys.argv) > 5 else None
    sock = socket.create_connection((host, port))

    def send(obj: dict) -> None:
        sock.sendall((json.dumps(obj) + "\n").encode())

    send({"conn_id": conn_id, "token": token, "info": ""})
    received = 0
    for line in sock.makefile("r", encoding="utf-8"):
        event = json.loads(line)
        if event["type"] == "ok":
            print("connected as", event["conn_id"], flush=True)
        elif event["type"] == "message":
            print(event["data"], flush=True)
            received += 1
            if count is not None and received == count:
                return 0
        elif event["type"] == "ping":
            send({"type": "pong"})
        elif event["type"] in ("error", "close"):
            print("comet:", event, file=sys.stderr)
            return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
