"""A minimal Kubernetes API client (stdlib only) for the node's helpers:
JSON over HTTPS with a client certificate."""

import json
import ssl
import urllib.error
import urllib.request


class Api:
    def __init__(self, server, ca, cert, key):
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
            return json.load(resp)

    def get(self, path):
        return self.request("GET", path)

    def items(self, path):
        return self.get(path).get("items") or []


def add_args(parser):
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)


def from_args(args):
    return Api(args.server, args.ca, args.cert, args.key)


HTTPError = urllib.error.HTTPError
