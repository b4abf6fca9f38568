#!/usr/bin/env python3
"""Cluster DNS for the single-node cluster (no CoreDNS package exists here).

Answers A queries for Services the way CoreDNS's kubernetes plugin does:
<svc>.<ns>.svc.cluster.local is the ClusterIP, or every ready endpoint address
of a headless Service; <hostname>.<svc>.<ns>.svc.cluster.local is one endpoint
(StatefulSet pods); <a-b-c-d>.<ns>.pod.cluster.local is that address. Known
names with other query types get an empty answer, everything else NXDOMAIN
(there is no upstream: pods reach nothing outside the machine). Services and
Endpoints are re-read every second, over UDP and TCP on port 53.
"""

import argparse
import socket
import socketserver
import struct
import sys
import threading
import time

import kubeapi

DOMAIN = "cluster.local"
TTL = 5


class Records:
    def __init__(self):
        self.lock = threading.Lock()
        self.names = {}

    def replace(self, names):
        with self.lock:
            self.names = names

    def lookup(self, name):
        name = name.lower().rstrip(".")
        parts = name.split(".")
        if len(parts) == 5 and parts[2:] == ["pod", "cluster", "local"]:
            ip = parts[0].replace("-", ".")
            try:
                socket.inet_aton(ip)
                return [ip]
            except OSError:
                return None
        with self.lock:
            return self.names.get(name)


def load(api):
    names = {}
    endpoints = {}
    for ep in api.items("/api/v1/endpoints"):
        meta = ep["metadata"]
        addrs = []
        for subset in ep.get("subsets") or []:
            for a in subset.get("addresses") or []:
                addrs.append(a)
        endpoints[(meta["namespace"], meta["name"])] = addrs
    for svc in api.items("/api/v1/services"):
        meta = svc["metadata"]
        ns, name = meta["namespace"], meta["name"]
        fqdn = f"{name}.{ns}.svc.{DOMAIN}"
        ip = svc["spec"].get("clusterIP")
        addrs = endpoints.get((ns, name), [])
        if ip and ip != "None":
            names[fqdn] = [ip]
        else:
            names[fqdn] = sorted({a["ip"] for a in addrs})
        for a in addrs:
            if a.get("hostname"):
                names[f"{a['hostname']}.{fqdn}"] = [a["ip"]]
    return names


def refresh(api, records):
    while True:
        try:
            records.replace(load(api))
        except Exception as e:  # keep serving the last answers
            print(f"dns: refresh failed: {e}", file=sys.stderr, flush=True)
        time.sleep(1)


def parse_question(msg):
    """(id, flags, qname, qtype, qclass, end offset) of the first question."""
    qid, flags, qd = struct.unpack("!HHH", msg[:6])
    if qd < 1:
        raise ValueError("no question")
    labels, i = [], 12
    while True:
        n = msg[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed question")
        labels.append(msg[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    qtype, qclass = struct.unpack("!HH", msg[i : i + 4])
    return qid, flags, ".".join(labels), qtype, qclass, i + 4


def answer(msg, records):
    try:
        qid, flags, qname, qtype, qclass, end = parse_question(msg)
    except (ValueError, IndexError, struct.error):
        return None
    question = msg[12:end]
    rd = flags & 0x0100
    ips = records.lookup(qname)
    if ips is None:
        rcode, answers = 3, []  # NXDOMAIN
    else:
        rcode = 0
        answers = ips if qtype in (1, 255) and qclass == 1 else []
    header = struct.pack("!HHHHHH", qid, 0x8400 | rd | rcode, 1, len(answers), 0, 0)
    body = b"".join(
        struct.pack("!HHHIH", 0xC00C, 1, 1, TTL, 4) + socket.inet_aton(ip) for ip in answers
    )
    return header + question + body


class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        reply = answer(data, self.server.records)
        if reply:
            sock.sendto(reply, self.client_address)


class Tcp(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            reply = answer(self.rfile.read(n), self.server.records)
            if not reply:
                return
            self.wfile.write(struct.pack("!H", len(reply)) + reply)


class ThreadingUdp(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True


class ThreadingTcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=53)
    kubeapi.add_args(parser)
    args = parser.parse_args()
    records = Records()
    api = kubeapi.from_args(args)
    threading.Thread(target=refresh, args=(api, records), daemon=True).start()
    udp = ThreadingUdp((args.listen, args.port), Udp)
    tcp = ThreadingTcp((args.listen, args.port), Tcp)
    udp.records = tcp.records = records
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print(f"dns: serving {DOMAIN} on {args.listen}:{args.port}", file=sys.stderr, flush=True)
    udp.serve_forever()


if __name__ == "__main__":
    main()
