#!/usr/bin/env python3
"""Dynamic hostPath volumes for the single-node cluster's default
StorageClass ("standard", provisioner walden.local/hostpath).

Every second: a Pending claim of a class with this provisioner that the
scheduler has placed (annotation volume.kubernetes.io/selected-node, since
the class binds WaitForFirstConsumer) gets a directory under --root and a
hostPath PersistentVolume pre-bound to it; a Released volume of this
provisioner loses its directory and is deleted (reclaimPolicy Delete).
Directories are mode 0777 because hostPath ignores fsGroup and the pods run
as non-root users. Only directories this program created are ever removed.
"""

import argparse
import os
import shutil
import sys
import time

import kubeapi

PROVISIONER = "walden.local/hostpath"


def our_classes(api):
    return {
        sc["metadata"]["name"]
        for sc in api.items("/apis/storage.k8s.io/v1/storageclasses")
        if sc.get("provisioner") == PROVISIONER
    }


def volume_for(pvc, root):
    meta = pvc["metadata"]
    name = f"pvc-{meta['uid']}"
    path = os.path.join(root, f"{meta['namespace']}-{meta['name']}-{meta['uid']}")
    return name, path, {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": pvc["spec"]["resources"]["requests"]["storage"]},
            "accessModes": pvc["spec"]["accessModes"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": pvc["spec"]["storageClassName"],
            "hostPath": {"path": path, "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


def provision(api, root, classes):
    for pvc in api.items("/api/v1/persistentvolumeclaims"):
        spec, meta = pvc["spec"], pvc["metadata"]
        annotations = meta.get("annotations") or {}
        if (
            pvc.get("status", {}).get("phase") != "Pending"
            or spec.get("volumeName")
            or spec.get("storageClassName") not in classes
            or "volume.kubernetes.io/selected-node" not in annotations
        ):
            continue
        name, path, pv = volume_for(pvc, root)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o777)
        try:
            api.request("POST", "/api/v1/persistentvolumes", pv)
            print(f"provisioner: {name} at {path} for {meta['namespace']}/{meta['name']}", flush=True)
        except kubeapi.HTTPError as e:
            if e.code != 409:  # already exists: created on an earlier pass
                raise


def reclaim(api, root):
    for pv in api.items("/api/v1/persistentvolumes"):
        annotations = pv["metadata"].get("annotations") or {}
        if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
            continue
        if pv.get("status", {}).get("phase") != "Released":
            continue
        if pv["spec"].get("persistentVolumeReclaimPolicy") != "Delete":
            continue
        path = pv["spec"].get("hostPath", {}).get("path", "")
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(root):
            shutil.rmtree(path, ignore_errors=True)
        name = pv["metadata"]["name"]
        try:
            api.request("DELETE", f"/api/v1/persistentvolumes/{name}")
            print(f"provisioner: deleted {name} and {path}", flush=True)
        except kubeapi.HTTPError as e:
            if e.code != 404:
                raise


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True)
    kubeapi.add_args(parser)
    args = parser.parse_args()
    api = kubeapi.from_args(args)
    os.makedirs(args.root, exist_ok=True)
    print(f"provisioner: {PROVISIONER} in {args.root}", file=sys.stderr, flush=True)
    while True:
        try:
            classes = our_classes(api)
            provision(api, args.root, classes)
            reclaim(api, args.root)
        except Exception as e:  # retry on the next pass
            print(f"provisioner: {e}", file=sys.stderr, flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
