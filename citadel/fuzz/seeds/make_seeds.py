#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into corpus/<target>/ (run from
citadel/fuzz). The committed corpora started from these and grew by fuzzing."""
import base64, glob, hashlib, json, os, re, struct

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(FUZZ))


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(FUZZ, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


K = bytes(range(32))
DERP_MAGIC = b"DERP\xf0\x9f\x94\x91"
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"


def derp(ty, body):
    return bytes([ty]) + struct.pack(">I", len(body)) + body


frames = [
    derp(1, DERP_MAGIC + K), derp(2, K + bytes(24) + b"\x00" * 40), derp(3, bytes(24) + b"\x01" * 30),
    derp(4, K + b"hello"), derp(5, K + b"payload"), derp(6, b""), derp(7, b"\x01"),
    derp(8, K + b"\x00"), derp(9, K), derp(9, K + bytes(18) + b"\x01"), derp(0x0a, K + K + b"fwd"),
    derp(0x10, b""), derp(0x11, K), derp(0x12, b"12345678"), derp(0x13, b"87654321"),
    derp(0x14, b"problem"), derp(0x15, struct.pack(">II", 100, 2000)),
]
for f in frames:
    put("derp_frame", f)
put("derp_frame", b"".join(frames))

ping = b"\x01\x00" + bytes(range(12)) + K
pong = b"\x02\x00" + bytes(range(12)) + bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]) + b"\x1f\x90"
cmm = b"\x03\x00" + (bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]) + b"\x00\x50") * 2
for m in (ping, pong, cmm, b"\x03\x00"):
    put("disco_open", m)
    put("disco_open", DISCO_MAGIC + K + bytes(24) + m + bytes(16))

tx = bytes(range(12))
req = struct.pack(">HHI", 1, 0, 0x2112A442) + tx
put("stun_parse", req)
attrs = b"\x80\x22\x00\x04test"
put("stun_parse", struct.pack(">HHI", 1, len(attrs) + 8, 0x2112A442) + tx + attrs + b"\x80\x28\x00\x04\x00\x00\x00\x00")
xor = struct.pack(">HHHH", 0x0020, 8, 0x0001, 0x1F90 ^ 0x2112) + bytes(a ^ b for a, b in zip([127, 0, 0, 1], b"\x21\x12\xa4\x42"))
put("stun_parse", struct.pack(">HHI", 0x0101, len(xor), 0x2112A442) + tx + xor)
x6 = struct.pack(">HHHH", 0x0020, 20, 0x0002, 0x1F90 ^ 0x2112) + bytes(16)
put("stun_parse", struct.pack(">HHI", 0x0101, len(x6), 0x2112A442) + tx + x6)

for body in (b"", b"hello", bytes(100)):
    put("control_noise_frame", b"\x04" + struct.pack(">H", len(body)) + body)
put("control_noise_frame", b"\x03\x00\x05error\x04\x00\x02hi\x02\x00\x30" + bytes(48))
put("noise_handshake", b"\x00\x5a\x01\x00\x60" + bytes(96))
put("noise_handshake", b"hello, noise")
put("noise_handshake", bytes(range(256)) * 4)

peer = {
    "ID": 2, "StableID": "n2", "Name": "b.acme.mesh.", "User": 1, "Key": "nodekey:" + "11" * 32,
    "KeyExpiry": "0001-01-01T00:00:00Z", "Machine": "mkey:" + "22" * 32, "DiscoKey": "discokey:" + "33" * 32,
    "Addresses": ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], "AllowedIPs": ["100.64.0.2/32"],
    "Endpoints": ["192.168.1.2:41641"], "HomeDERP": 1, "Hostinfo": {"Hostname": "b", "OS": "linux"},
    "Created": "2026-01-01T00:00:00Z", "Online": True, "MachineAuthorized": True, "Tags": ["tag:x"],
    "PrimaryRoutes": ["10.0.0.0/24"], "LastSeen": "2026-01-01T00:00:00Z",
}
me = dict(peer, ID=1, StableID="n1", Name="a.acme.mesh.", Addresses=["100.64.0.1/32"])
derpmap = {"Regions": {"1": {"RegionID": 1, "RegionCode": "x", "RegionName": "x", "Nodes": [
    {"Name": "1a", "RegionID": 1, "HostName": "127.0.0.1", "DERPPort": 443, "STUNPort": 3478, "InsecureForTests": True}]}}}
mapresp = {
    "KeepAlive": False, "Node": me, "Peers": [peer], "PeersChanged": [peer], "PeersRemoved": [3],
    "PeersChangedPatch": [{"NodeID": 2, "DERPRegion": 1, "Endpoints": ["1.2.3.4:5"], "Online": False}],
    "OnlineChange": {"2": True}, "PeerSeenChange": {"2": True}, "DERPMap": derpmap, "Domain": "acme.mesh",
    "DNSConfig": {"Resolvers": [{"Addr": "100.100.100.100"}], "Domains": ["acme.mesh"]},
    "PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}], "IPProto": [6, 17]}],
    "UserProfiles": [{"ID": 1, "LoginName": "acme", "DisplayName": "acme"}], "CollectServices": "false",
    "ControlTime": "2026-01-01T00:00:00Z", "Debug": {}, "SSHPolicy": {"rules": []},
}
regreq = {"Version": 90, "NodeKey": "nodekey:" + "11" * 32, "OldNodeKey": "nodekey:" + "00" * 32,
          "Auth": {"AuthKey": "abc"}, "Expiry": "0001-01-01T00:00:00Z", "Followup": "",
          "Hostinfo": {"Hostname": "a", "OS": "linux", "RoutableIPs": ["10.0.0.0/24"], "RequestTags": ["tag:x"]},
          "Ephemeral": False, "NodeKeySignature": None}
mapreq = {"Version": 90, "Compress": "zstd", "KeepAlive": True, "NodeKey": "nodekey:" + "11" * 32,
          "DiscoKey": "discokey:" + "33" * 32, "Endpoints": ["1.2.3.4:5"], "EndpointTypes": [1],
          "Stream": True, "Hostinfo": {"Hostname": "a", "NetInfo": {"PreferredDERP": 1}}, "OmitPeers": False, "ReadOnly": False}
regresp = {"User": {"ID": 1, "LoginName": "acme", "DisplayName": "acme"}, "Login": {"ID": 1, "LoginName": "acme"},
           "NodeKeyExpired": False, "MachineAuthorized": True, "AuthURL": "http://x/register/abc", "Error": ""}
docs = [regreq, mapreq, regresp, mapresp, {"nodeKeyChallenge": "chalpub:" + "44" * 32},
        {"legacyPublicKey": "mkey:" + "00" * 32, "publicKey": "mkey:" + "55" * 32}]
for i, d in enumerate(docs):
    put("tailcfg_json", bytes([i]) + json.dumps(d).encode())
for z in (0,):
    body = json.dumps(mapresp).encode()
    put("map_frame", bytes([z]) + struct.pack("<I", len(body)) + body)
    ka = b'{"KeepAlive":true}'
    put("map_frame", bytes([z]) + struct.pack("<I", len(ka)) + ka + struct.pack("<I", len(ka)) + ka)

policies = []
for path in glob.glob(os.path.join(ROOT, "nexus-sim/src/policy/*.rs")) + glob.glob(os.path.join(ROOT, "nexus-sim/src/lib.rs")):
    text = open(path).read()
    for m in re.finditer(r'r#"(.*?)"#', text, re.S):
        t = m.group(1)
        if "acls" in t or "groups" in t or "hosts" in t or "tagOwners" in t:
            policies.append(t)
for p in policies[:60]:
    put("policy_hujson", p)
for path in sorted(glob.glob(os.path.join(ROOT, "scenarios/*.toml"))):
    put("scenario_toml", open(path, "rb").read())

routes = {0: b"", 1: json.dumps({"name": "acme", "displayName": "Acme"}), 2: b"1\n", 3: b"1/globex\n",
          5: json.dumps({"user": "1", "reusable": True, "ephemeral": False, "expiration": "2030-01-01T00:00:00Z", "aclTags": ["tag:x"]}),
          6: json.dumps({"user": "1", "key": "abc"}), 8: json.dumps({"user": "acme", "key": "mkey:" + "00" * 32}),
          9: b"1\n", 11: b"1\n", 12: b"1/newname\n", 14: json.dumps({"policy": policies[0] if policies else "{}"}),
          16: json.dumps({"expiration": "2030-01-01T00:00:00Z"}), 17: json.dumps({"prefix": "abcdef"}), 18: b"abcdef\n",
          19: json.dumps({"user_code": "ABCD-EFGH", "user": "acme"}), 20: json.dumps({"user_code": "ABCD-EFGH"}),
          21: b"abc\n", 22: b"client_id=x&scope=y", 23: b"grant_type=urn:ietf:params:oauth:grant-type:device_code&device_code=x",
          25: b"abc\n"}
for sel, body in routes.items():
    body = body.encode() if isinstance(body, str) else body
    put("rest_api", bytes([sel]) + body)
    put("rest_api", bytes([sel | 0x80]) + body)

for m in (b"\x00\x05\x02\x00\x02", b"\x01\x01\x04user\x08password", b"\x02\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
          b"\x02\x05\x01\x00\x03\x0bexample.com\x01\xbb", b"\x02\x05\x03\x00\x04" + bytes(16) + b"\x00\x35",
          b"\x03\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x35payload", b"\x03\x00\x00\x00\x03\x04mesh\x00\x35dns"):
    put("socks5_request", m)

for h in (b"CONNECT db.acme.mesh:5432 HTTP/1.1\r\nHost: db.acme.mesh:5432\r\n\r\n",
          b"CONNECT [fd7a::1]:443 HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n",
          b"GET http://web.acme.mesh:8080/path?q=1 HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, x-foo\r\nX-Foo: 1\r\n\r\nbody",
          b"POST http://100.64.0.1/ HTTP/1.0\r\nContent-Length: 4\r\nProxy-Connection: close\r\n\r\nabcd"):
    put("http_proxy_head", h)

for r in (b"+OK\r\n", b"-ERR wrong\r\n", b":42\r\n", b"$3\r\nfoo\r\n", b"$-1\r\n", b"*-1\r\n", b"*0\r\n",
          b"*2\r\n$1\r\na\r\n*2\r\n:5\r\n$0\r\n\r\n",
          b"*1\r\n*2\r\n$9\r\njobs:main\r\n*1\r\n*2\r\n$15\r\n1700000000000-0\r\n*4\r\n$4\r\ntype\r\n$13\r\nSHELL_COMMAND\r\n$7\r\npayload\r\n$2\r\n{}\r\n"):
    put("resp_reply", r)
