#!/usr/bin/env python3
"""Generate the identities an attestmesh release needs, without helm, nats or nsc CLIs.

Writes into OUT (created 0700, files 0600):

* ``identities.values.json`` — public material for the chart (commit it if you like): the
  NATS user nkeys (``natsUsers``, ``collector.nodeIdentities.nodes``) and the public halves
  of the signing keys (``trustedKeys``).
* ``secrets.json`` — a Kubernetes ``List`` of one Secret per identity
  (``<fullname>-<identity>``: ``nats.seed``, ``signing.key``, ``broker-sealing.key``) to
  apply with ``kubectl apply -f`` or to feed to a secret store. Never commit it.
* ``secrets.values.json`` — the same private material as chart values, for
  ``secrets.create=true`` on test clusters. Never commit it.
* ``collector-nodes/<node>.nk`` — with ``--collector-nodes``: each node's seed, to install
  on that host at ``collector.nodeIdentities.seedHostPath``.
* ``operator.key`` — the operator's signing key for policies and reference values
  (``attestmesh policy set`` / ``attestmesh refvalues add --operator-key``). Only its public
  half goes to the cluster (``trustedKeys.operator``); keep the key off it.

Needs ``cryptography`` and ``nkeys`` (both in the project's dev extras).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

FAMILIES = ("snp", "tdx", "sgx")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def nats_user() -> tuple[str, str]:
    """A fresh NATS user key pair as (seed ``SU...``, public ``U...``)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def signing_key() -> tuple[str, str]:
    """A fresh ES256 (P-256) key as (PKCS#8 private PEM, SubjectPublicKeyInfo PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


def _secret(name: str, namespace: str, identity: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/part-of": "attestmesh",
                "attestmesh.io/identity": identity,
            },
        },
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


def generate(
    fullname: str, namespace: str, families: list[str], collector_nodes: list[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, str]]:
    """(public values, Secret list, private values, per-node seeds)."""
    users: dict[str, Any] = {"verifiers": {}}
    trusted: dict[str, str] = {}
    private: dict[str, dict[str, str]] = {}
    secrets: list[dict[str, Any]] = []

    def identity(name: str, *, signs: bool, seals: bool = False) -> str:
        seed, public = nats_user()
        values: dict[str, str] = {"natsSeed": seed}
        data = {"nats.seed": seed.encode()}
        if signs:
            pem, public_pem = signing_key()
            trusted[name] = public_pem
            values["signingKey"] = pem
            data["signing.key"] = pem.encode()
        if seals:
            sealing = os.urandom(32)
            values["sealingKey"] = base64.b64encode(sealing).decode()
            data["broker-sealing.key"] = sealing
        private[name] = values
        secrets.append(_secret(f"{fullname}-{name}", namespace, name, data))
        return public

    for family in families:
        users["verifiers"][family] = identity(f"verifier-{family}", signs=True)
    users["policy"] = identity("policy", signs=True)
    users["broker"] = identity("broker", signs=True, seals=True)  # signs audit checkpoints
    users["admin"] = identity("admin", signs=False)

    node_keys: dict[str, str] = {}
    node_seeds: dict[str, str] = {}
    for node in collector_nodes:
        seed, public = nats_user()
        node_keys[node] = public
        node_seeds[node] = seed

    public_values: dict[str, Any] = {
        "verifier": {"families": families},
        "natsUsers": users,
        "trustedKeys": trusted,
    }
    if node_keys:
        public_values["collector"] = {"nodeIdentities": {"nodes": node_keys}}
    secret_list = {"apiVersion": "v1", "kind": "List", "items": secrets}
    private_values = {"secrets": {"create": True, "private": private}}
    return public_values, secret_list, private_values, node_seeds


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory (created 0700)")
    parser.add_argument(
        "--fullname",
        default="attestmesh",
        help="the chart's fullname: the release name if it contains 'attestmesh', "
        "else <release>-attestmesh (default: attestmesh)",
    )
    parser.add_argument("--namespace", default="attestmesh")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma separated")
    parser.add_argument("--collector-nodes", default="", help="comma separated node names")
    args = parser.parse_args(argv)

    families = [f for f in args.families.split(",") if f]
    nodes = [n for n in args.collector_nodes.split(",") if n]
    bad = [f for f in families if f not in FAMILIES] + [n for n in nodes if not _TOKEN.match(n)]
    if bad or not families:
        print(f"gen-identities: invalid families or node names: {bad}", file=sys.stderr)
        return 2
    if not _DNS_LABEL.match(args.fullname) or not _DNS_LABEL.match(args.namespace):
        print("gen-identities: --fullname and --namespace must be DNS labels", file=sys.stderr)
        return 2

    public, secret_list, private, seeds = generate(args.fullname, args.namespace, families, nodes)
    args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(args.out / "secrets.json", json.dumps(secret_list, indent=2) + "\n")
    _write(args.out / "secrets.values.json", json.dumps(private, indent=2) + "\n")
    operator_pem, operator_public = signing_key()
    public["trustedKeys"]["operator"] = operator_public
    _write(args.out / "operator.key", operator_pem)
    _write(args.out / "identities.values.json", json.dumps(public, indent=2) + "\n")
    if seeds:
        node_dir = args.out / "collector-nodes"
        node_dir.mkdir(mode=0o700, exist_ok=True)
        for node, seed in seeds.items():
            _write(node_dir / f"{node}.nk", seed + "\n")
    print(f"wrote identities for {', '.join(sorted(private['secrets']['private']))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
