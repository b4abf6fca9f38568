"""Table tests of the node's DNS answers and the provisioner's decisions:
python3 -m unittest discover -s e2e/cluster/node"""

import socket
import struct
import unittest

import dns
import provisioner


def query(name, qtype=1):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def decode(reply):
    qid, flags, _, count = struct.unpack("!HHHH", reply[:8])
    ips, i = [], len(reply) - 16 * count
    for _ in range(count):
        ips.append(socket.inet_ntoa(reply[i + 12 : i + 16]))
        i += 16
    return qid, flags & 0xF, ips


class DnsTest(unittest.TestCase):
    def setUp(self):
        self.records = dns.Records()
        self.records.replace(
            {
                "s3.e2e.svc.cluster.local": ["10.0.0.7"],
                "pg.e2e.svc.cluster.local": ["172.17.0.5", "172.17.0.6"],
                "pg-0.pg.e2e.svc.cluster.local": ["172.17.0.5"],
            }
        )

    def test_answers(self):
        cases = [
            ("s3.e2e.svc.cluster.local", 1, 0, ["10.0.0.7"]),
            ("S3.E2E.svc.cluster.local", 1, 0, ["10.0.0.7"]),
            ("pg.e2e.svc.cluster.local", 1, 0, ["172.17.0.5", "172.17.0.6"]),
            ("pg-0.pg.e2e.svc.cluster.local", 1, 0, ["172.17.0.5"]),
            ("s3.e2e.svc.cluster.local", 28, 0, []),  # AAAA of a known name: no data
            ("s3.e2e.svc.cluster.local.e2e.svc.cluster.local", 1, 3, []),  # search-path miss
            ("deb.debian.org", 1, 3, []),  # nothing outside the cluster
            ("172-17-0-9.e2e.pod.cluster.local", 1, 0, ["172.17.0.9"]),
            ("not-an-ip.e2e.pod.cluster.local", 1, 3, []),
        ]
        for name, qtype, rcode, ips in cases:
            with self.subTest(name=name, qtype=qtype):
                qid, got_rcode, got_ips = decode(dns.answer(query(name, qtype), self.records))
                self.assertEqual((qid, got_rcode, got_ips), (0x1234, rcode, ips))

    def test_garbage_is_ignored(self):
        for msg in (b"", b"\x00" * 5, struct.pack("!HHHHHH", 1, 0, 0, 0, 0, 0)):
            self.assertIsNone(dns.answer(msg, self.records))


class ProvisionerTest(unittest.TestCase):
    def test_volume_is_prebound_below_the_root(self):
        pvc = {
            "metadata": {"namespace": "e2e", "name": "data-pg-0", "uid": "u-1"},
            "spec": {"resources": {"requests": {"storage": "1Gi"}}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "standard"},
        }
        name, path, pv = provisioner.volume_for(pvc, "/v/pv")
        self.assertEqual(name, "pvc-u-1")
        self.assertEqual(path, "/v/pv/e2e-data-pg-0-u-1")
        self.assertEqual(pv["spec"]["claimRef"]["uid"], "u-1")
        self.assertEqual(pv["spec"]["hostPath"]["path"], path)
        self.assertEqual(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete")
        self.assertEqual(pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"], provisioner.PROVISIONER)


if __name__ == "__main__":
    unittest.main()
