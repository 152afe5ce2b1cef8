"""Hardware identities: which machine a piece of verified evidence proves it came from.

A node name is pinned to the identity of the hardware that first attested under it, so each
family names one value that is (a) covered by the signature or chain it has just verified,
(b) different on every machine, and (c) stable across reboots, guest rebuilds and routine TCB
updates, so a pinned node does not need a reset after every firmware upgrade. Identities are
``<kind>:<lowercase hex>``; the kind keeps two families from ever colliding on one value.

Callers pass only values read from evidence that verified; these functions do not verify.
"""

from __future__ import annotations

import hashlib

MAX_HWID = 200


def _make(kind: str, value: bytes) -> str:
    return f"{kind}:{value.hex()}"


def snp(chip_id: bytes, vek_spki_der: bytes) -> str:
    """CHIP_ID, unless the guest masked it (VLEK-signed reports, MASK_CHIP_ID): then the VEK.

    Why: CHIP_ID is fused per processor and survives TCB updates; a VLEK has no hardware ID in
    its certificate and is re-derived per TCB version, so its key is the best a masked report
    offers (a TCB update then needs ``attestmesh node reset``).
    """
    if any(chip_id):
        return _make("snp.chip_id", hashlib.sha256(chip_id).digest())
    return _make("snp.vek", hashlib.sha256(vek_spki_der).digest())


def dcap(platform_instance_id: bytes | None, ppid: bytes) -> str:
    """The PCK's platform instance id on multi-package platforms, else its PPID.

    Why: both are in Intel's signed PCK certificate and survive TCB recoveries (PCKs are
    re-issued, the platform keeps them); FMSPC names a platform *model*, shared by thousands.
    """
    if platform_instance_id is not None and any(platform_instance_id):
        return _make("dcap.platform_instance", platform_instance_id)
    return _make("dcap.ppid", ppid)


def nitro(module_id: str) -> str | None:
    """The parent EC2 instance in the signed ``module_id`` (``i-...`` before ``-enc...``).

    Why: the leaf certificate and the enclave id are new at every enclave launch, while the
    parent instance is the machine the enclave runs on; the hypervisor writes and signs it.
    """
    instance, sep, _enclave = module_id.partition("-enc")
    if not sep or not instance.startswith("i-"):
        return None
    return _make("nitro.instance", instance.encode())


def tpm(ak_public_der: bytes) -> str:
    """SHA-256 of the AK public key. Why: the AK lives inside that TPM and signed the quote."""
    return _make("tpm.ak", hashlib.sha256(ak_public_der).digest())


def azure(ak_public_sha256_hex: str) -> str | None:
    """The vTPM AK that the SNP/TD report binds through the HCL runtime data.

    Why: Azure moves a deallocated CVM to other hosts, so the chip changes under a VM while
    its vTPM AK stays; the hardware report certifies the AK, so it is hardware-rooted.
    """
    try:
        digest = bytes.fromhex(ak_public_sha256_hex)
    except ValueError:
        return None
    return _make("az.ak", digest) if len(digest) == 32 else None


def cca(instance_id: bytes) -> str | None:
    """The platform token's instance id. Why: it names the CPAK, one per CCA platform."""
    return _make("cca.instance", instance_id) if any(instance_id) else None
