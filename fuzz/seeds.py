#!/usr/bin/env python3
"""Writes the seed corpora, fuzz/corpus/<target>/seed-*: a few valid inputs
per target in the layouts the targets document. Re-run after changing a
target's input layout; libFuzzer's own finds are not committed."""
import base64, json, os, struct, zlib

ROOT = os.path.dirname(os.path.abspath(__file__))
seeds = {}

def add(target, name, data):
    seeds.setdefault(target, {})[name] = data.encode() if isinstance(data, str) else bytes(data)

# control_frame: max (u16) | n | cuts | stream
def frame(p): return b"\x01" + struct.pack(">I", len(p)) + p
def wire(m): return struct.pack(">H", len(m)) + m
add("control_frame", "frames", struct.pack(">HB", 256, 4) + bytes([3, 1, 0, 7]) + frame(b'{"type":"keep_alive"}') + frame(b""))
add("control_frame", "wire", struct.pack(">HB", 64, 1) + bytes([2]) + wire(b"abc") + wire(b"\x01" * 40))
add("control_frame", "too-large", struct.pack(">HB", 8, 0) + frame(b"x" * 9))
def gz(b): c = zlib.compressobj(1, zlib.DEFLATED, 31); return c.compress(b) + c.flush()
raw = b'[0.5,"o","hello hello hello"]\n' * 20
add("control_frame", "gzip-chunk", struct.pack(">HB", 4096, 0) + frame(b"\x01\x02" + struct.pack(">QIB", 0, len(raw), 8) + b"0123abcd" + gz(raw)))

# control_http: raw heads
add("control_http", "upgrade", "GET /tailgate/control HTTP/1.1\r\nHost: h:1\r\nConnection: Upgrade\r\nUpgrade: tailgate-control\r\nUser-Agent: tailgate/0.1.0\r\n\r\n\x00\x20noise")
add("control_http", "relay", "GET /tailgate/relay HTTP/1.0\r\nUpgrade:  tailgate-relay \r\n\r\n")
add("control_http", "101", "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: tailgate-control\r\n\r\n")

# relay_frame: type | body
k = bytes(range(32))
add("relay_frame", "send", b"\x01" + k + b"\x04\x00\x00\x00wireguard")
add("relay_frame", "recv", b"\x02" + k + b"TGDSC\x02")
add("relay_frame", "keepalive", b"\x03")
add("relay_frame", "accepted", b"\x04\x00\x1e")
add("relay_frame", "closing", b"\x05replaced by a newer connection")
add("relay_frame", "peer-gone", b"\x06" + k)

# disco: mode | body (mode 0 raw datagram, 1 nonce|counter|plaintext, 2 at|xor|plaintext)
tx = bytes(range(12))
ping = b"\x01" + tx
pong4 = b"\x02" + tx + b"\x04" + bytes([203, 0, 113, 7]) + struct.pack(">H", 41641)
pong6 = b"\x02" + tx + b"\x06" + bytes.fromhex("20010db8000000000000000000000007") + struct.pack(">H", 41641)
cmm = b"\x03\x02" + b"\x04" + bytes([192, 0, 2, 1]) + struct.pack(">H", 1) + b"\x06" + bytes(16) + struct.pack(">H", 2)
add("disco", "raw", b"\x00" + b"TGDSC\x02" + bytes(32) + bytes(24) + bytes(16) + ping)
add("disco", "plain-ping", b"\x01" + bytes(24) + struct.pack(">Q", 1) + ping)
add("disco", "plain-pong6", b"\x01" + bytes(24) + struct.pack(">Q", 2) + pong6)
add("disco", "plain-cmm", b"\x01" + bytes(24) + struct.pack(">Q", 3) + cmm)
add("disco", "mutate-pong4", b"\x02" + struct.pack(">HB", 40, 0x80) + pong4)
add("disco", "mutate-cmm", b"\x02" + struct.pack(">HB", 0, 0) + cmm)

# stun: family | ip | port | datagram
COOKIE = 0x2112A442
def stun(mtype, txid, attrs=b"", fingerprint=False):
    body = attrs
    if fingerprint:
        hdr = struct.pack(">HHI", mtype, len(body) + 8, COOKIE) + txid
        crc = (zlib.crc32(hdr + body) ^ 0x5354554E) & 0xFFFFFFFF
        body += struct.pack(">HHI", 0x8028, 4, crc)
    return struct.pack(">HHI", mtype, len(body), COOKIE) + txid + body
def attr(t, v): return struct.pack(">HH", t, len(v)) + v + bytes(-len(v) % 4)
v4 = b"\x00" + bytes([198, 51, 100, 9]) + struct.pack(">H", 3478)
v6 = b"\x01" + bytes.fromhex("20010db8000000000000000000000009") + struct.pack(">H", 3478)
add("stun", "request", v4 + stun(0x0001, tx))
add("stun", "request-fingerprint", v6 + stun(0x0001, tx, fingerprint=True))
add("stun", "request-change", v4 + stun(0x0001, tx, attr(0x0003, bytes(4))))
xport = 41641 ^ (COOKIE >> 16)
xaddr = struct.unpack(">I", bytes([203, 0, 113, 7]))[0] ^ COOKIE
add("stun", "response", v4 + stun(0x0101, tx, attr(0x0020, struct.pack(">BBHI", 0, 1, xport, xaddr)) + attr(0x8022, b"tailgate")))
add("stun", "response-mapped", v4 + stun(0x0101, tx, attr(0x0001, struct.pack(">BBH", 0, 1, 41641) + bytes([203, 0, 113, 7]))))

# wg_datagram: flags | (kind | len u16 | body)*
def op(kind, body=b""): return bytes([kind]) + struct.pack(">H", len(body)) + body
udp = struct.pack(">HHHH", 5000, 6000, 13, 0) + b"hello"
add("wg_datagram", "handshake", b"\x01")
add("wg_datagram", "ipv4", b"\x01" + op(2, b"\x00" + bytes(4) + b"\x11" + udp) + op(4))
add("wg_datagram", "spoofed", b"\x01" + op(2, b"\x01" + bytes([100, 64, 0, 3]) + b"\x11" + udp))
add("wg_datagram", "tampered", b"\x01" + op(1, struct.pack(">HB", 20, 1) + bytes([0x45]) + bytes(19)))
add("wg_datagram", "from-a", b"\x01" + op(3, bytes([0x45, 0, 0, 20]) + bytes(8) + bytes([100, 64, 0, 1, 100, 64, 0, 2])) + op(5))
# Found by fuzzing: an IPv4 total length (1) shorter than the header.
add("wg_datagram", "short-total-length", b"\x01" + op(1, struct.pack(">HB", 0, 0) + bytes([0x45, 0, 0, 1]) + bytes(8) + bytes([100, 64, 0, 2, 100, 64, 0, 1])))
add("wg_datagram", "raw-init", b"\x00" + op(0, b"\x00" + b"\x01\x00\x00\x00" + bytes(144)))

# policy: the shipped policies plus a tiny one
for f in ("default", "solo", "team"):
    with open(os.path.join(ROOT, "..", "policies", f + ".toml"), "rb") as fh:
        add("policy", f, fh.read())
add("policy", "tiny", '[groups]\nadmins = ["alice@example.com"]\n\n[[ssh]]\naction = "accept"\nsrc = ["group:admins"]\ndst = ["*"]\nusers = ["root"]\n')

# netmap_json: messages as a node (and the server) receive them
def key(b): return base64.b64encode(bytes([b]) * 32).decode()
self_node = {"node_id": 1, "node_key": key(1), "name": "self", "fqdn": "self.ts", "ips": ["100.64.0.1"],
             "user": "alice@example.com", "tags": [], "key_expiry": None, "ephemeral": False}
peer = {"node_id": 2, "node_key": key(2), "name": "web1", "fqdn": "web1.ts", "ips": ["100.64.0.2", "fd7a::2"],
        "user": None, "tags": ["tag:web"], "endpoints": ["198.51.100.9:41641", "[2001:db8::9]:41641"],
        "ssh_host_key": None, "online": True}
policy = {"version": 3, "name": "p.toml", "text": '[[ssh]]\naction = "accept"\nsrc = ["*"]\ndst = ["*"]\nusers = ["root"]\n'}
add("netmap_json", "map-full", json.dumps({"type": "map_full", "self_node": self_node, "domain": "ts", "peers": [peer], "policy": policy}))
add("netmap_json", "map-delta", json.dumps({"type": "map_delta", "peers_removed": [key(3)], "peers_added": [peer], "policy": policy}))
add("netmap_json", "login-ok", json.dumps({"type": "login_ok", "new_node": True, "node": self_node, "domain": "ts", "keepalive_secs": 30}))
add("netmap_json", "error", json.dumps({"type": "error", "code": "auth_key", "message": "no"}))
add("netmap_json", "register", json.dumps({"type": "register", "auth_key": "k", "hostname": "h", "endpoints": ["192.0.2.1:1"]}))

for target, files in seeds.items():
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, "seed-" + name), "wb") as fh:
            fh.write(data)
