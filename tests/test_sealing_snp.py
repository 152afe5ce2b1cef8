"""The SEV-SNP derived sealing key against a fake sev-guest driver and firmware that read the
request through the kernel's pointers: the exact bytes asked for, a key bound to the launch
and the chip, and every failure path failing closed with its own reason."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest

from services.broker.sealing import AeadKey
from services.broker.snpkey import (
    ARG,
    REQUEST,
    SNP_GET_DERIVED_KEY,
    KeyRequest,
    SnpDerivedKeySource,
    field_select,
    parse_response,
)
from services.broker.store import SecretStore
from services.mesh.errors import SealingError
from services.testing.memkv import MemoryKeyValue
from services.testing.snpkeys import IOCTL_GET_DERIVED_KEY, FakeSnpFirmware

MEASUREMENT = bytes(range(48))


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """Something openable read-write where the character device would be."""
    path = tmp_path / "sev-guest"
    path.write_bytes(b"")
    return path


def source(firmware: FakeSnpFirmware, device: Path, **request: object) -> SnpDerivedKeySource:
    return SnpDerivedKeySource(KeyRequest(**request), device=device, ioctl=firmware.ioctl)  # type: ignore[arg-type]


def refused(source: SnpDerivedKeySource, reason: str) -> SealingError:
    with pytest.raises(SealingError) as caught:
        source.sealing_key()
    assert caught.value.reason == reason, caught.value
    return caught.value


def test_ioctl_number_and_layouts_match_the_kernel_header() -> None:
    assert SNP_GET_DERIVED_KEY == IOCTL_GET_DERIVED_KEY == 0xC0205301
    assert ARG.size == REQUEST.size == 32
    assert field_select(["policy", "measurement"]) == 0b1001
    assert field_select(["tcb_version", "guest_svn", "family_id", "image_id"]) == 0b110110


def test_request_bytes_are_exactly_msg_key_req(device: Path) -> None:
    firmware = FakeSnpFirmware(measurement=MEASUREMENT, guest_vmpl=1, launch_svn=9)
    request = {"vmpl": 2, "guest_svn": 7, "fields": ("measurement", "policy", "guest_svn")}
    source(firmware, device, **request).sealing_key()
    (seen,) = firmware.requests
    assert seen.raw == struct.pack("<IIQIIQ", 0, 0, 0b11001, 2, 7, 0)
    source(firmware, device, root_key="vmrk", vmpl=3, tcb_version=2**63 + 5).sealing_key()
    assert firmware.requests[1].raw == struct.pack("<IIQIIQ", 1, 0, 0b1001, 3, 0, 2**63 + 5)


def test_the_key_is_stable_and_bound_to_launch_chip_and_request(device: Path) -> None:
    firmware = FakeSnpFirmware(measurement=MEASUREMENT)
    key = source(firmware, device).sealing_key()
    assert source(firmware, device).sealing_key().key_id == key.key_id
    # The firmware's own key is never used as is: ours is an HKDF of it.
    raw = firmware.key_for(firmware.requests[0])
    assert key.key_id != AeadKey(raw).key_id
    chip = firmware.chip_secret
    new_image = FakeSnpFirmware(measurement=bytes(48), chip_secret=chip)
    debuggable = FakeSnpFirmware(
        measurement=MEASUREMENT, policy=0x30000 | 1 << 19, chip_secret=chip
    )
    other_chip = FakeSnpFirmware(measurement=MEASUREMENT)
    for other in (new_image, debuggable, other_chip):
        assert source(other, device).sealing_key().key_id != key.key_id
    same = FakeSnpFirmware(measurement=MEASUREMENT, chip_secret=chip, vm_secret=b"v" * 32)
    assert source(same, device).sealing_key().key_id == key.key_id
    assert source(firmware, device, vmpl=1).sealing_key().key_id != key.key_id
    assert source(firmware, device, root_key="vmrk").sealing_key().key_id != key.key_id


def test_a_store_sealed_by_one_image_does_not_open_in_another(device: Path) -> None:
    import asyncio

    async def scenario() -> None:
        kv = MemoryKeyValue()
        firmware = FakeSnpFirmware(measurement=MEASUREMENT)
        store = await SecretStore.open(kv, source(firmware, device))
        await store.put("default/key/app", b"value")
        again = await SecretStore.open(kv, source(firmware, device))
        assert await again.get("default/key/app") == b"value"
        changed = FakeSnpFirmware(measurement=bytes(48), chip_secret=firmware.chip_secret)
        with pytest.raises(SealingError) as caught:
            await SecretStore.open(kv, source(changed, device))
        assert caught.value.reason == "broker.wrong_key"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "fields",
    [(), ("policy",), ("measurement",), ("image_id", "family_id", "policy")],
)
def test_fields_that_do_not_bind_the_key_to_this_guest_are_refused(fields: tuple[str]) -> None:
    with pytest.raises(SealingError) as caught:
        KeyRequest(fields=fields)
    assert caught.value.reason == "broker.sealing_params_invalid"


@pytest.mark.parametrize(
    "request_",
    [{"root_key": "vlek"}, {"vmpl": 4}, {"guest_svn": 2**32}, {"tcb_version": -1}],
)
def test_out_of_range_requests_are_refused(request_: dict[str, object]) -> None:
    with pytest.raises(SealingError) as caught:
        KeyRequest(**request_)  # type: ignore[arg-type]
    assert caught.value.reason == "broker.sealing_params_invalid"


def test_a_missing_device_says_where_it_looked(tmp_path: Path) -> None:
    firmware = FakeSnpFirmware()
    error = refused(source(firmware, tmp_path / "sev-guest"), "broker.sealing_key_missing")
    assert str(tmp_path / "sev-guest") in error.detail
    assert firmware.requests == []


@pytest.mark.parametrize(
    ("failure", "reason", "words"),
    [
        ((errno.EIO, 0x16, 0), "broker.snp_firmware_error", "INVALID_PARAM"),
        ((errno.EIO, 0x27, 0), "broker.snp_firmware_error", "INVALID_KEY"),
        ((errno.ETIMEDOUT, 0, 2), "broker.sealing_key_unavailable", "BUSY"),
        ((errno.ENOTTY, 0xFFFFFFFF, 0), "broker.sealing_key_unavailable", "ENOTTY"),
    ],
)
def test_device_failures_fail_closed(
    device: Path, failure: tuple[int, int, int], reason: str, words: str
) -> None:
    firmware = FakeSnpFirmware(fail=failure)
    error = refused(source(firmware, device), reason)
    assert words in error.detail and f"fw_error 0x{failure[1]:x}" in error.detail


def test_a_refused_request_is_a_status_not_a_key(device: Path) -> None:
    firmware = FakeSnpFirmware(launch_svn=1, guest_vmpl=2)
    error = refused(source(firmware, device, vmpl=1), "broker.snp_key_refused")
    assert "0x16" in error.detail
    fields = ("measurement", "policy", "guest_svn")
    refused(source(firmware, device, vmpl=2, guest_svn=2, fields=fields), "broker.snp_key_refused")


@pytest.mark.parametrize(
    "response",
    [
        b"",  # nothing written: the zeroed buffer carries no key
        struct.pack("<I28x", 0) + bytes(32),
        struct.pack("<I", 0) + b"\x01" + bytes(27) + b"k" * 32,  # a reserved byte set
        struct.pack("<I28x", 0) + b"k" * 24,  # short: the last word stays zero
        struct.pack("<I28x", 0) + b"k" * 8 + bytes(8) + b"k" * 16,  # a hole
    ],
)
def test_garbled_responses_are_refused(device: Path, response: bytes) -> None:
    refused(source(FakeSnpFirmware(response=response), device), "broker.snp_response_malformed")


def test_parse_response_checks_its_size() -> None:
    with pytest.raises(SealingError, match="snp_response_malformed"):
        parse_response(bytes(63))


def test_errors_and_reprs_never_carry_the_key(device: Path) -> None:
    firmware = FakeSnpFirmware()
    src = source(firmware, device)
    key = src.derive()
    firmware.fail = (errno.EIO, 0x16, 0)
    error = refused(src, "broker.snp_firmware_error")
    assert key.hex() not in str(error) and key.hex() not in repr(src)


def test_the_real_ioctl_on_something_that_is_not_the_device_fails_closed(device: Path) -> None:
    """The default seam is fcntl.ioctl itself: a regular file answers ENOTTY, untouched."""
    error = refused(
        SnpDerivedKeySource(KeyRequest(), device=device), "broker.sealing_key_unavailable"
    )
    assert "ENOTTY" in error.detail and "fw_error 0x0" in error.detail
