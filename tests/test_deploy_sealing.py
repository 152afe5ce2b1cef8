"""The chart's broker.sealing.source: ``file`` (the default, copied by the init container)
and ``k8s-secret`` (the Secret mounted read-only on the broker container alone and read in
place), rendered, validated strictly, and the projected Secret accepted by the broker's
Kubernetes Secret source as kubelet lays it out."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from services.broker.k8ssecret import KubernetesSecretSource
from services.broker.sealing import KEY_FILE_NAME, AeadKey
from services.mesh import config as config_mod
from tests.chart import (
    CRD_KINDS,
    FULLNAME,
    KUBERNETES_VERSION,
    Doc,
    default_values,
    merge_values,
    needs_helm,
    needs_validator,
    one,
    render,
    render_files,
)

BROKER = f"{FULLNAME}-broker"
MOUNT = "/etc/attestmesh/sealing"


def _pod(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment", BROKER)["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def in_place(identities: dict[str, Any]) -> list[Doc]:
    values = merge_values(
        merge_values(default_values(identities), identities["private"]),
        {"broker": {"sealing": {"source": "k8s-secret"}}},
    )
    return render(values)


@needs_helm
def test_the_default_copies_the_key_through_the_init_container(
    renders: dict[str, list[Doc]],
) -> None:
    pod = _pod(renders["default"])
    (init,) = pod["initContainers"]
    assert (
        'put "$src/identity/broker-sealing.key" "$dst/data/broker-sealing.key"' in (init["args"][0])
    )
    (main,) = pod["containers"]
    assert not any(m["name"] == "sealing-key" for m in main["volumeMounts"])
    assert not any(e["name"].startswith("ATTESTMESH_SEALING") for e in main["env"])


@needs_helm
def test_in_place_mounts_only_the_sealing_key_on_the_broker(in_place: list[Doc]) -> None:
    pod = _pod(in_place)
    (main,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["ATTESTMESH_SEALING_SOURCE"] == "k8s-secret"
    assert env["ATTESTMESH_SEALING_SECRET_DIR"] == MOUNT
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == "sealing-key"]
    assert mount == {"name": "sealing-key", "mountPath": MOUNT, "readOnly": True}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "sealing-key"]
    assert volume["secret"] == {
        "secretName": BROKER,
        "defaultMode": 0o400,
        "items": [{"key": KEY_FILE_NAME, "path": KEY_FILE_NAME}],
    }
    # The init container neither copies the key nor sees it; the seed and the signing key
    # still reach only the init container.
    (init,) = pod["initContainers"]
    assert "broker-sealing.key" not in init["args"][0]
    (identity,) = [v for v in pod["volumes"] if v["name"] == "identity"]
    assert KEY_FILE_NAME not in {i["key"] for i in identity["secret"]["items"]}
    assert {m["name"] for m in main["volumeMounts"]} & {"identity", "trusted"} == set()
    # No other workload gets the key or the settings.
    others = [d for d in in_place if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}]
    for doc in others:
        if doc["metadata"]["name"] != BROKER:
            volumes = doc["spec"]["template"]["spec"]["volumes"]
            assert not any(v["name"] == "sealing-key" for v in volumes), doc["metadata"]["name"]


@needs_helm
@needs_validator
def test_in_place_validates_strictly(in_place: list[Doc]) -> None:
    from kubernetes_validate import utils  # type: ignore[import-untyped]

    for doc in in_place:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        utils.validate(doc, KUBERNETES_VERSION, strict=True)


@needs_helm
def test_in_place_from_an_existing_secret(identities: dict[str, Any]) -> None:
    """A Secret synced from a secret store: the broker's own Secret need not hold the key."""
    private = identities["private"]["secrets"]["private"]
    without_key = {k: v for k, v in private["broker"].items() if k != "sealingKey"}
    values = merge_values(
        merge_values(default_values(identities), {"secrets": {"create": True}}),
        {
            "secrets": {"private": {**private, "broker": without_key}},
            "broker": {
                "sealing": {"source": "k8s-secret", "secretName": "vault-sealing", "secretKey": "k"}
            },
        },
    )
    docs = render(values)
    (volume,) = [v for v in _pod(docs)["volumes"] if v["name"] == "sealing-key"]
    assert volume["secret"]["secretName"] == "vault-sealing"
    assert volume["secret"]["items"] == [{"key": "k", "path": KEY_FILE_NAME}]
    assert KEY_FILE_NAME not in one(docs, "Secret", BROKER)["data"]
    # The file source still needs the key in the broker's Secret.
    from helm_python.errors import HelmError

    with pytest.raises(HelmError, match="sealingKey"):
        render_files(merge_values(values, {"broker": {"sealing": {"source": "file"}}}))
    with pytest.raises(HelmError):
        render_files(merge_values(values, {"broker": {"sealing": {"source": "snp"}}}))


def _kubelet_projection(mount: Path, data: bytes, mode: int) -> None:
    """What kubelet writes for the broker's sealing-key volume (an fsGroup adds group-read)."""
    mount.mkdir(mode=0o1777)
    stamped = mount / "..2026_03_01_12_00_00.987654321"
    stamped.mkdir(mode=0o755)
    (stamped / KEY_FILE_NAME).write_bytes(data)
    (stamped / KEY_FILE_NAME).chmod(mode)
    (mount / "..data").symlink_to(stamped.name)
    (mount / KEY_FILE_NAME).symlink_to(f"..data/{KEY_FILE_NAME}")
    if os.geteuid() == 0:
        for path in (mount, stamped, stamped / KEY_FILE_NAME):
            os.chown(path, 0, 10001)


@needs_helm
def test_the_projected_secret_is_what_the_broker_reads(
    in_place: list[Doc], identities: dict[str, Any], tmp_path: Path
) -> None:
    sealing = base64.b64decode(identities["private"]["secrets"]["private"]["broker"]["sealingKey"])
    pod = _pod(in_place)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "sealing-key"]
    fs_group = pod["securityContext"]["fsGroup"]
    assert fs_group == 10001
    # defaultMode 0400, plus the group-read kubelet adds for the pod's fsGroup.
    _kubelet_projection(tmp_path / "sealing", sealing, volume["secret"]["defaultMode"] | 0o040)
    (main,) = pod["containers"]
    env = {e["name"]: e["value"] for e in main["env"] if "value" in e}
    local = {k: v.replace(MOUNT, str(tmp_path / "sealing")) for k, v in env.items()}
    config = config_mod.load(
        None,
        sealing_source=local["ATTESTMESH_SEALING_SOURCE"],
        sealing_secret_dir=local["ATTESTMESH_SEALING_SECRET_DIR"],
    )
    from services.broker.keysources import from_config

    key = from_config(config, {}).sealing_key()
    assert key.key_id == AeadKey(sealing).key_id
    assert isinstance(from_config(config, {}), KubernetesSecretSource)
