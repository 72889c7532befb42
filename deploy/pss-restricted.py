#!/usr/bin/env python3
"""Checks rendered Kubernetes manifests against the Pod Security Standards "restricted" profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), as an admission controller
enforcing it would: every pod template must pass, or the cluster refuses the pod.

Usage: pss-restricted.py RENDERED.yaml   (exit 1 with one line per violation)
"""
import sys

import yaml

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def pod_specs(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        yield spec
    elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        yield spec["template"]["spec"]
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]


def violations(name, pod):
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            yield f"{name}: {key}"
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            yield f"{name}: volume {volume['name']} of type {sorted(kinds)}"
    containers = (pod.get("containers") or []) + (pod.get("initContainers") or [])
    for c in containers:
        csc = c.get("securityContext") or {}
        where = f"{name}/{c['name']}"
        if csc.get("privileged"):
            yield f"{where}: privileged"
        if csc.get("allowPrivilegeEscalation") is not False:
            yield f"{where}: allowPrivilegeEscalation is not false"
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            yield f"{where}: capabilities do not drop ALL"
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            yield f"{where}: adds capabilities {caps.get('add')}"
        if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            yield f"{where}: runAsNonRoot is not true"
        if csc.get("runAsUser", psc.get("runAsUser")) == 0:
            yield f"{where}: runs as user 0"
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in SECCOMP_OK:
            yield f"{where}: seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost"


def main(path):
    found = []
    pods = 0
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            for pod in pod_specs(doc):
                pods += 1
                found += violations(f"{doc['kind']}/{doc['metadata']['name']}", pod)
    for v in found:
        print(f"restricted: {v}")
    if found:
        sys.exit(1)
    print(f"ok -- {pods} pod templates meet the Pod Security Standards \"restricted\" profile")


if __name__ == "__main__":
    main(sys.argv[1])
