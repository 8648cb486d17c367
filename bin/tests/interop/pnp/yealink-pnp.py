#!/usr/bin/env python3
"""A Yealink T46S at first boot, as captured: it multicasts its SIP PnP SUBSCRIBE
(Event: ua-profile) to 224.0.1.75 and waits for the 200 and the NOTIFY carrying its
provisioning URL, which it answers with 200. Prints one JSON line: what it got.

usage: yealink-pnp.py LOCAL_IP GROUP_PORT MAC [WAIT_SECONDS]"""
import json
import random
import socket
import sys
import time

local_ip, port, mac = sys.argv[1], int(sys.argv[2]), sys.argv[3]
wait = float(sys.argv[4]) if len(sys.argv) > 4 else 8.0

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((local_ip, 5060))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local_ip))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)

branch = "z9hG4bK%d" % random.randint(10**8, 10**9)
call_id = "%d@%s" % (random.randint(10**8, 10**9), local_ip)
tag = str(random.randint(10**8, 10**9))
subscribe = (
    f"SUBSCRIBE sip:{mac}@224.0.1.75:{port} SIP/2.0\r\n"
    f"Via: SIP/2.0/UDP {local_ip}:5060;branch={branch}\r\n"
    f"From: <sip:{mac}@224.0.1.75:{port}>;tag={tag}\r\n"
    f"To: <sip:{mac}@224.0.1.75:{port}>\r\n"
    f"Call-ID: {call_id}\r\n"
    "CSeq: 1 SUBSCRIBE\r\n"
    f"Contact: <sip:{local_ip}:5060>\r\n"
    "Accept: application/url\r\n"
    "Max-Forwards: 70\r\n"
    "User-Agent: Yealink SIP-T46S 66.86.0.15 00:15:65:aa:bb:cc\r\n"
    "Expires: 0\r\n"
    'Event: ua-profile;profile-type="device";vendor="Yealink";model="T46S";version="66.86.0.15"\r\n'
    "Content-Length: 0\r\n\r\n"
)
sock.sendto(subscribe.encode(), ("224.0.1.75", port))

got = {"subscribe_status": None, "notify_event": None, "notify_type": None, "url": None}
deadline = time.time() + wait
while time.time() < deadline and got["url"] is None:
    sock.settimeout(max(0.05, deadline - time.time()))
    try:
        data, src = sock.recvfrom(65535)
    except socket.timeout:
        break
    text = data.decode(errors="replace")
    head, _, body = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    if lines[0].startswith("SIP/2.0 "):
        if "SUBSCRIBE" in headers.get("cseq", ""):
            got["subscribe_status"] = int(lines[0].split()[1])
    elif lines[0].startswith("NOTIFY "):
        got["notify_event"] = headers.get("event")
        got["notify_type"] = headers.get("content-type")
        got["url"] = body.strip()
        vias = [l for l in lines[1:] if l.lower().startswith("via:")]
        ok = "SIP/2.0 200 OK\r\n" + "".join(v + "\r\n" for v in vias)
        for h in ("from", "to", "call-id", "cseq"):
            ok += "%s: %s\r\n" % (h.title() if h != "call-id" else "Call-ID", headers.get(h, ""))
        ok += "Content-Length: 0\r\n\r\n"
        sock.sendto(ok.encode(), src)
print(json.dumps(got))
