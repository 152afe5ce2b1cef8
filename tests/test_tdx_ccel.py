"""TDX CCEL event logs replayed against the RTMRs: replay, appraisal, wire, worker, collector.

Logs are built here (the TPM test builder writes SHA-1/SHA-256 logs; a TD's log is SHA-384 only)
and quoted by the Intel test PKI, so the real ``TdxVerifier`` checks them end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.collector.sources.configfs_tsm import DEFAULT_CCEL, ConfigfsTsmSource, read_ccel
from services.mesh import events
from services.mesh.bus import Bus
from services.mesh.errors import AttestmeshError, ParseError
from services.mesh.keys import SigningKey
from services.testing.fakes import FakeConfigfsTsm, dcap_collateral, tdx_backend
from services.testing.intel_pki import IntelTestPki, TdFields, enclave_report, sgx_quote, td_quote
from services.testing.tpm_pki import EventLogBuilder
from services.verifier import ear
from services.verifier.families.base import Appraisal, Status, VerifyOptions
from services.verifier.families.dcap import ccel
from services.verifier.families.dcap.ccel import CCEL_FILE, replay_ccel, used_log
from services.verifier.families.sgx import SgxVerifier
from services.verifier.families.tdx import TdxVerifier
from services.verifier.worker import VerifierWorker, evidence_collateral, expected_report_data

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
PKI = IntelTestPki(now=NOW)
PLATFORM = PKI.platform()
TDX_COLLATERAL = dcap_collateral(PKI, PLATFORM, tdx=True)
SGX_COLLATERAL = dcap_collateral(PKI, PLATFORM, tdx=False)
TRUST = PKI.trust_store()

SHA384 = 0x000C
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_IPL = 0xD
EV_EFI_ACTION = 0x80000007
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_HANDOFF_TABLES2 = 0x8000000B


@dataclass
class CcelBuilder:
    """A TDVF-style log: Spec ID event (SHA-384 only), then events with SHA-384 digests."""

    events: list[tuple[int, int, bytes, bytes]] = field(default_factory=list)

    def measure(
        self, index: int, kind: int, data: bytes, digest: bytes | None = None
    ) -> CcelBuilder:
        """An event whose digest is SHA-384 of ``data`` unless ``digest`` is given."""
        self.events.append((index, kind, data, digest or hashlib.sha384(data).digest()))
        return self

    def encode(self, *, fill: int = 0) -> bytes:
        """The log, followed by ``fill`` bytes of erased (0xFF) log area."""
        spec = (b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
                + struct.pack("<HH", SHA384, 48) + b"\x00")  # fmt: skip
        out = struct.pack("<II", 1, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec
        for index, kind, data, digest in self.events:
            out += struct.pack("<IIIH", index, kind, 1, SHA384) + digest
            out += struct.pack("<I", len(data)) + data
        return out + b"\xff" * fill

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """RTMR[0..3] after extending every measured event from 48 zero bytes."""
        values = [bytes(48)] * 5
        for index, kind, _data, digest in self.events:
            if kind != EV_NO_ACTION:
                values[index] = hashlib.sha384(values[index] + digest).digest()
        return values[1], values[2], values[3], values[4]


def boot_log() -> CcelBuilder:
    """Firmware, boot loader and kernel events on RTMR[0..2]; RTMR[3] stays zero, as on GCE."""
    return (
        CcelBuilder()
        .measure(1, EV_EFI_HANDOFF_TABLES2, b"\x09TdxTable\x00" + bytes(16))
        .measure(1, EV_EFI_VARIABLE_DRIVER_CONFIG, bytes(range(256)) * 4)
        .measure(1, EV_SEPARATOR, bytes(4))
        .measure(2, EV_EFI_ACTION, b"Calling EFI Application from Boot Option")
        .measure(3, EV_IPL, b"grub_cmd: linux /boot/vmlinuz console=ttyS0\x00")
        .measure(2, EV_EFI_ACTION, b"Exit Boot Services Returned with Success")
    )


def appraise(
    log: bytes | None, rtmrs: tuple[bytes, ...], *, quote: bytes | None = None
) -> Appraisal:
    collateral = dict(TDX_COLLATERAL)
    if log is not None:
        collateral[CCEL_FILE] = log
    if quote is None:
        quote = td_quote(PLATFORM, TdFields(rtmrs=rtmrs))
    options = VerifyOptions(now=NOW, trust=TRUST, collateral=collateral)
    return TdxVerifier().appraise(quote, options)


def codes(appraisal: Appraisal) -> list[str]:
    return [r.code for r in appraisal.reasons]


def ccel_checks(appraisal: Appraisal) -> list[tuple[bool, str]]:
    return [(c.ok, c.detail) for c in appraisal.checks if c.name == "ccel_replay"]


# --- appraisal with the real TDX verifier -------------------------------------------------------


def test_replaying_log_is_affirmed_with_its_events_as_claims() -> None:
    log = boot_log()
    appraisal = appraise(log.encode(fill=4096), log.rtmrs())
    assert appraisal.status == Status.AFFIRMING and appraisal.verified, appraisal.reasons
    claims = appraisal.claims
    assert claims["ccel_verified"] is True
    assert claims["rtmr3"] == "00" * 48
    assert ccel_checks(appraisal) == [(True, "6 events replay to RTMR[0..3]")]
    listed = claims["ccel_events"]
    assert [(e["index"], e["rtmr"], e["type"]) for e in listed] == [
        (1, 0, "EV_EFI_HANDOFF_TABLES2"),
        (1, 0, "EV_EFI_VARIABLE_DRIVER_CONFIG"),
        (1, 0, "EV_SEPARATOR"),
        (2, 1, "EV_EFI_ACTION"),
        (3, 2, "EV_IPL"),
        (2, 1, "EV_EFI_ACTION"),
    ]
    assert listed[1] == {
        "index": 1,
        "rtmr": 0,
        "type": "EV_EFI_VARIABLE_DRIVER_CONFIG",
        "digest": hashlib.sha384(bytes(range(256)) * 4).hexdigest(),
        "size": 1024,
        "data": bytes(range(32)).hex(),
    }
    assert listed[4]["text"] == "grub_cmd: linux /boot/vmlinuz console=ttyS0"
    assert listed[2]["data"] == "00000000"
    json.dumps(appraisal.to_json())


@pytest.mark.parametrize("event", [0, 3, 4], ids=["rtmr0", "rtmr1-last", "rtmr2"])
def test_one_flipped_event_digest_is_an_rtmr_mismatch(event: int) -> None:
    honest = boot_log()
    tampered = boot_log()
    index, kind, data, digest = tampered.events[event]
    tampered.events[event] = (index, kind, data, bytes([digest[0] ^ 1]) + digest[1:])
    appraisal = appraise(tampered.encode(fill=64), honest.rtmrs())
    assert appraisal.status == Status.CONTRAINDICATED
    assert codes(appraisal) == ["tdx.ccel_rtmr_mismatch"]
    assert f"RTMR[{index - 1}]" in appraisal.reasons[0].message
    assert "ccel_verified" not in appraisal.claims and "ccel_events" not in appraisal.claims
    assert ccel_checks(appraisal)[0][0] is False
    assert appraisal.verified  # the quote itself is fine; its log is not


def test_rtmr_extended_outside_the_log_is_a_mismatch_naming_it() -> None:
    log = boot_log()
    rtmrs = (*log.rtmrs()[:3], hashlib.sha384(bytes(48) + b"\x07" * 48).digest())
    appraisal = appraise(log.encode(), rtmrs)
    assert codes(appraisal) == ["tdx.ccel_rtmr_mismatch"]
    assert appraisal.reasons[0].message.endswith("the quoted RTMR[3]")


def test_garbage_log_is_malformed() -> None:
    appraisal = appraise(b"\x00\x01 not an event log", boot_log().rtmrs())
    assert appraisal.status == Status.CONTRAINDICATED
    assert codes(appraisal) == ["tdx.ccel_malformed"]
    assert "ccel_verified" not in appraisal.claims


def test_without_a_log_nothing_changes() -> None:
    appraisal = appraise(None, boot_log().rtmrs())
    assert appraisal.status == Status.AFFIRMING, appraisal.reasons
    assert not [k for k in appraisal.claims if k.startswith("ccel")]
    assert ccel_checks(appraisal) == []


def test_a_quote_that_does_not_verify_is_not_replayed() -> None:
    log = boot_log()
    quote = bytearray(td_quote(PLATFORM, TdFields(rtmrs=log.rtmrs())))
    quote[48 + 200] ^= 1  # inside the signed TD report body
    appraisal = appraise(log.encode(), log.rtmrs(), quote=bytes(quote))
    assert appraisal.status == Status.CONTRAINDICATED and not appraisal.verified
    assert not [c for c in codes(appraisal) if "ccel" in c]
    assert ccel_checks(appraisal) == [(False, "not replayed: the quote did not verify")]


def test_sgx_ignores_a_ccel_file() -> None:
    collateral = {**SGX_COLLATERAL, CCEL_FILE: b"garbage"}
    options = VerifyOptions(now=NOW, trust=TRUST, collateral=collateral)
    appraisal = SgxVerifier().appraise(sgx_quote(PLATFORM, enclave_report()), options)
    assert appraisal.status == Status.AFFIRMING, appraisal.reasons
    assert ccel_checks(appraisal) == [] and "ccel_verified" not in appraisal.claims


# --- replay_ccel: the parser's bounds and TDX's index rules -------------------------------------


def test_mrtd_and_no_action_events_are_neither_replayed_nor_claimed() -> None:
    log = boot_log().measure(0, EV_IPL, b"MRTD is built by the TDX module")
    log.measure(4, EV_NO_ACTION, b"StartupLocality\x00\x03")
    result = replay_ccel(log.encode(), boot_log().rtmrs())
    assert result.ok and result.matched == (True,) * 4
    assert result.replayed == boot_log().rtmrs()
    assert len(result.events) == 6 and {e["index"] for e in result.events} == {1, 2, 3}


def _pad_to(size: int) -> bytes:
    """An area of ``size`` bytes whose events end well inside the parser's bound."""
    return boot_log().encode().ljust(size, b"\xff")


def _short_sha384() -> bytes:
    """A log whose Spec ID gives SHA-384 32-byte digests, and whose events carry such digests."""
    log = CcelBuilder().measure(1, EV_IPL, b"x", bytes(32)).encode()
    return log.replace(struct.pack("<HH", SHA384, 48), struct.pack("<HH", SHA384, 32))


def _many_events() -> bytes:
    return CcelBuilder([(1, EV_IPL, b"", bytes(48))] * (ccel.MAX_EVENTS + 1)).encode()


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "pcrIndex truncated"),
    ("only fill", b"\xff" * 4096, "pcrIndex truncated"),
    ("sha-256 log", EventLogBuilder().measure(1, EV_IPL, b"x").encode(), "bank 0x000c"),
    ("truncated event", boot_log().encode()[:-10], "event data truncated"),
    ("index beyond RTMR[3]", boot_log().measure(5, EV_IPL, b"x").encode(), "MR index 5"),
    ("sha-384 of the wrong size", _short_sha384(), "SHA-384 a wrong size"),
    ("area over 1 MiB", _pad_to(ccel.MAX_AREA_SIZE + 1), "log area of 1048577 bytes"),
    ("used part over 512 KiB", b"\x00" * (512 * 1024 + 1), "event log of 524289 bytes"),
    ("too many events", _many_events(), "more than 512 measured events"),
    # Fails closed: the data's own trailing 0xFF cannot be told from the erased area.
    ("data ending in 0xff", boot_log().measure(1, EV_IPL, b"\xff").encode(), "data truncated"),
]


@pytest.mark.parametrize(
    ("log", "wanted"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_logs_raise_a_typed_error(log: bytes, wanted: str) -> None:
    with pytest.raises(ParseError) as caught:
        replay_ccel(log, boot_log().rtmrs())
    assert caught.value.reason == "tdx.ccel_malformed"
    assert wanted in caught.value.detail


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=2000), st.binary(max_size=8))
def test_any_bytes_replay_or_raise_parse_error(noise: bytes, at: int, splice: bytes) -> None:
    """Random bytes, and a valid log with bytes spliced in, never raise anything but ParseError."""
    valid = boot_log().encode()
    for log in (noise, valid[:at] + splice + valid[at + len(splice) :]):
        try:
            result = replay_ccel(log, boot_log().rtmrs())
        except ParseError as exc:
            assert exc.reason == "tdx.ccel_malformed"
        else:
            json.dumps(list(result.events))


def test_fill_up_to_the_area_bound_is_accepted() -> None:
    result = replay_ccel(_pad_to(ccel.MAX_AREA_SIZE), boot_log().rtmrs())
    assert result.ok


def test_claims_of_the_largest_log_fit_in_an_ear() -> None:
    worst = b'"\\' * 40 + b"\x00"  # printable, and every character needs escaping in JSON
    log = CcelBuilder()
    for i in range(ccel.MAX_EVENTS):  # the longest type name, the longest summary
        log.measure(1 + i % 4, EV_EFI_VARIABLE_DRIVER_CONFIG, worst)
    result = replay_ccel(log.encode(), log.rtmrs())
    assert result.ok and len(result.events) == ccel.MAX_EVENTS
    claims = {**appraise(None, log.rtmrs()).claims, "ccel_events": list(result.events)}
    appraisal = Appraisal(family="tdx", status=Status.AFFIRMING, claims=claims, verified=True)
    subject = ear.Subject(node="n", evidence_id="e", nonce=b"\x01" * 32, public_key=b"\x02" * 32)
    token = ear.issue(SigningKey.generate("verifier-tdx"), appraisal, subject, now=NOW, ttl=60)
    assert len(token) < 256 * 1024


# --- wire, worker, collector --------------------------------------------------------------------


def test_tdx_evidence_round_trips_with_and_without_event_log() -> None:
    log = boot_log().encode()
    for evidence in (events.TdxEvidence(quote=b"q", event_log=log), events.TdxEvidence(quote=b"q")):
        event = events.EvidenceEvent(
            node="td-1", nonce=b"\x01" * 32, public_key=b"\x02" * 32, evidence=evidence
        )
        assert events.decode(events.encode(event), events.EvidenceEvent) == event
    raw = json.loads(events.encode(event))
    del raw["evidence"]["event_log"]  # as a sender from before the field existed writes it
    decoded = events.decode(json.dumps(raw).encode(), events.EvidenceEvent)
    assert isinstance(decoded.evidence, events.TdxEvidence) and decoded.evidence.event_log is None


class RecordingVerifier:
    family = "tdx"

    def __init__(self) -> None:
        self.seen: list[VerifyOptions] = []

    def appraise(self, evidence: bytes, options: VerifyOptions) -> Appraisal:
        self.seen.append(options)
        return Appraisal(family="tdx", status=Status.NONE)


def _worker(verifier: Any) -> VerifierWorker:
    """A worker used without its bus: :meth:`VerifierWorker.appraise` is the pure step."""
    key = SigningKey.generate("verifier-tdx")
    return VerifierWorker(
        cast(Bus, None), "tdx", verifier, key, TRUST, collateral=TDX_COLLATERAL, clock=lambda: NOW
    )


def test_worker_passes_the_event_log_as_ccel_bin() -> None:
    recorder = RecordingVerifier()
    worker = _worker(recorder)
    log = boot_log().encode()
    for evidence in (events.TdxEvidence(quote=b"q", event_log=log), events.TdxEvidence(quote=b"q")):
        event = events.EvidenceEvent(
            node="td-1", nonce=b"\x01" * 32, public_key=b"\x02" * 32, evidence=evidence
        )
        worker.appraise(event, "td-1")
    with_log, without = recorder.seen
    assert with_log.collateral[CCEL_FILE] == log
    assert CCEL_FILE not in without.collateral
    assert evidence_collateral(events.SnpEvidence(report=b"r")) == {}


def test_worker_verdict_on_a_td_with_its_log() -> None:
    nonce, public_key = b"\x03" * 32, b"\x04" * 32
    log = boot_log()
    fields = TdFields(rtmrs=log.rtmrs(), report_data=expected_report_data(nonce, public_key))
    evidence = events.TdxEvidence(quote=td_quote(PLATFORM, fields), event_log=log.encode())
    event = events.EvidenceEvent(node="td-1", nonce=nonce, public_key=public_key, evidence=evidence)
    appraisal = _worker(TdxVerifier()).appraise(event, "td-1")
    assert appraisal.status == Status.AFFIRMING, appraisal.reasons
    assert appraisal.claims["ccel_verified"] is True


REPORT_DATA = hashlib.sha512(b"nonce || ephemeral public key").digest()


def _configfs(tmp_path: Path, **options: Any) -> tuple[FakeConfigfsTsm, ConfigfsTsmSource]:
    fields = TdFields(rtmrs=boot_log().rtmrs())
    fake = FakeConfigfsTsm(tmp_path / "report", "tdx_guest", tdx_backend(PLATFORM, fields))
    return fake, ConfigfsTsmSource(fake.root, files=fake, **options)


def test_configfs_source_attaches_the_ccel_log(tmp_path: Path) -> None:
    acpi = tmp_path / "acpi/tables/data"
    acpi.mkdir(parents=True)
    (acpi / "CCEL").write_bytes(boot_log().encode(fill=64 * 1024))
    fake, source = _configfs(tmp_path, ccel=acpi / "CCEL")
    evidence = source.collect(REPORT_DATA)
    assert isinstance(evidence, events.TdxEvidence)
    assert evidence.event_log == boot_log().encode()  # the erased fill stays on the node
    assert not fake.live and not fake.paths  # every descriptor closed
    options = VerifyOptions(
        now=NOW,
        trust=TRUST,
        collateral={**TDX_COLLATERAL, **evidence_collateral(evidence)},
        expected_report_data=REPORT_DATA,
    )
    appraisal = TdxVerifier().appraise(evidence.quote, options)
    assert appraisal.status == Status.AFFIRMING, appraisal.reasons
    assert appraisal.claims["ccel_verified"] is True


@pytest.mark.parametrize("where", ["no table", "no acpi dir", "disabled"])
def test_configfs_source_without_a_table_sends_no_log(tmp_path: Path, where: str) -> None:
    if where == "no table":
        (tmp_path / "data").mkdir()
    path = None if where == "disabled" else tmp_path / "data/CCEL"
    fake, source = _configfs(tmp_path, ccel=path)
    evidence = source.collect(REPORT_DATA)
    assert isinstance(evidence, events.TdxEvidence) and evidence.event_log is None
    assert not fake.paths


class Unreadable(FakeConfigfsTsm):
    """Denies the CCEL table as sysfs does to a non-root collector."""

    def before_open(self, path: Path, flags: int) -> None:
        if path.name == "CCEL":
            raise PermissionError(13, os.strerror(13))
        super().before_open(path, flags)


def test_an_unreadable_table_is_no_log(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data/CCEL").write_bytes(boot_log().encode())
    fake = Unreadable(tmp_path / "report", "tdx_guest", tdx_backend(PLATFORM))
    assert read_ccel(tmp_path / "data/CCEL", fake) is None
    assert not fake.paths


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("oversize", "collector.blob_too_large"),
        ("symlink", "collector.unsafe_path"),
        ("used part too large", "collector.bad_report"),
    ],
)
def test_a_suspicious_table_is_refused(tmp_path: Path, setup: str, reason: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if setup == "symlink":
        (tmp_path / "elsewhere").write_bytes(boot_log().encode())
        (data / "CCEL").symlink_to(tmp_path / "elsewhere")
    else:
        size = ccel.MAX_AREA_SIZE + 1 if setup == "oversize" else 600 * 1024
        (data / "CCEL").write_bytes(b"\x00" * size)
    with pytest.raises(AttestmeshError) as caught:
        read_ccel(data / "CCEL", None)
    assert caught.value.reason == reason


def test_used_log_is_idempotent() -> None:
    area = boot_log().encode(fill=100)
    assert used_log(used_log(area)) == used_log(area) == boot_log().encode()


def test_the_default_table_is_where_linux_exposes_it() -> None:
    assert str(DEFAULT_CCEL) == "/sys/firmware/acpi/tables/data/CCEL"
