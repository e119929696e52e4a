#!/usr/bin/env python3
"""A bare WebSocket client for tests/recovery.rs: `ws_reader.py <port> <path?query>`.
Upgrades, then prints the text of every frame it gets, one per line, until it is killed
or the connection ends. Standard library only, so that a test can SIGKILL a client
process that holds unread messages (its kernel then resets the connection)."""
import base64
import os
import socket
import sys

port, target = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port))
key = base64.b64encode(os.urandom(16)).decode()
sock.sendall(
    f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    .encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = sock.recv(4096)
    if not chunk:
        sys.exit(1)
    buf += chunk
head, buf = buf.split(b"\r\n\r\n", 1)
if b" 101 " not in head.split(b"\r\n")[0]:
    sys.exit(1)


def need(n):
    global buf
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit(0)
        buf += chunk


while True:
    need(2)
    opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
    start = 2
    if length == 126:
        need(4)
        length, start = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        need(10)
        length, start = int.from_bytes(buf[2:10], "big"), 10
    need(start + length)
    payload, buf = buf[start:start + length], buf[start + length:]
    if opcode == 1:
        print(payload.decode(), flush=True)
    elif opcode == 8:
        sys.exit(0)
