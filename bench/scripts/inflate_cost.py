"""The gateway's CPU per byte a client sends in tiny compressed messages vs plain ones.

Usage: inflate_cost.py WS_PORT GATEWAY_PID 1|0  (1: 14-byte permessage-deflate frames that
each inflate to 512 bytes, the default max_frame_size; 0: plain 20-byte text frames), for
a node with websocket_compression=on and no token check. Sends as fast as it can for 5 s
and prints the gateway's utime+stime per byte sent (bench/RESULTS.md, "Inbound compressed
messages").
"""
import socket, os, zlib, time, base64, sys, struct
port=int(sys.argv[1]); pid=int(sys.argv[2]); compressed=sys.argv[3]=='1'
def cpu():
    f=open(f'/proc/{pid}/stat').read().rsplit(')',1)[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf('SC_CLK_TCK')
s=socket.create_connection(('127.0.0.1',port))
key=base64.b64encode(os.urandom(16)).decode()
tok='%7B%22conn_id%22%3A%22amp%22%7D'
s.sendall((f"GET /ws?t={tok} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n").encode())
resp=s.recv(4096).decode(); assert '101' in resp, resp
assert ('permessage-deflate' in resp)==True, resp
def frame(payload, rsv1):
    mask=b'\x01\x02\x03\x04'
    b0=0x81 | (0x40 if rsv1 else 0)
    n=len(payload); hdr=bytes([b0, 0x80|n]) if n<126 else bytes([b0,0x80|126])+struct.pack('>H',n)
    return hdr+mask+bytes(c^mask[i%4] for i,c in enumerate(payload))
if compressed:
    c=zlib.compressobj(9, zlib.DEFLATED, -15); p=c.compress(b'a'*512)+c.flush(zlib.Z_SYNC_FLUSH); p=p[:-4]
    f=frame(p, True)
else:
    f=frame(b'a'*len(zlib.compress(b'a'*512)), False)
batch=f*(65536//len(f))
t0=time.time(); c0=cpu(); sent=0
while time.time()-t0<5:
    s.sendall(batch); sent+=len(batch)
c1=cpu()
print(f"compressed={compressed} frame={len(f)}B sent={sent/1e6:.1f}MB in 5s, gateway cpu {c1-c0:.2f}s, {(c1-c0)/sent*1e9:.1f} ns/byte, msgs={sent//len(f)}")
