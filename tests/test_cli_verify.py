"""`attestmesh verify`: the output and exit-code contract of DESIGN.md §6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main
from services.collector.simulator.node import SimulatedSnp, test_pki
from services.testing.vectors import roots_dir, vectors_root

ROOT = vectors_root()
needs_vectors = pytest.mark.skipif(
    ROOT is None or roots_dir() is None,
    reason="shared vectors not found: set ATTESTMESH_VECTORS or provide ../shared/vectors",
)


def _vector_args(family: str, vector_id: str, *extra: str) -> list[str]:
    assert ROOT is not None
    directory = ROOT / family / vector_id
    meta = json.loads((directory / "vector.json").read_text())
    args = [str(directory / meta["evidence"]["file"]), "--family", meta["family"]]
    if (directory / "collateral").is_dir():
        args += ["--collateral", str(directory / "collateral")]
    return ["verify", *args, "--roots", str(roots_dir()), "--at", meta["at"], "--offline", *extra]


@needs_vectors
@pytest.mark.parametrize(
    ("family", "vector_id", "status", "code"),
    [
        ("snp", "snp-trustee-milan-vcek-v2", "affirming", 0),
        ("snp", "snp-gosev-milan-v2", "contraindicated", 1),
        ("tdx", "tdx-dcaprs-00806f050000", "warning", 0),
        ("sgx", "sgx-dcapqvl-sample", "warning", 0),
    ],
)
def test_json_verdict_and_exit_code(
    family: str, vector_id: str, status: str, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_vector_args(family, vector_id, "--json")) == code
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["status"] == status
    assert verdict["family"] == family
    assert set(verdict) >= {"status", "family", "claims", "trust_vector", "reasons"}
    if family in ("tdx", "sgx"):
        assert "tcb_status" in verdict["claims"] and "advisories" in verdict["claims"]


@needs_vectors
def test_human_report_lists_each_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_vector_args("snp", "snp-gosev-milan-v2")) == 1
    out = capsys.readouterr().out
    assert "status: contraindicated" in out
    assert "[pass]" in out
    assert "reason snp.debug_enabled" in out


@needs_vectors
def test_nonce_must_match_report_data(capsys: pytest.CaptureFixture[str]) -> None:
    # A nonce the report does not carry: the binding check must fail.
    assert main(_vector_args("snp", "snp-trustee-milan-vcek-v2", "--nonce", "ff")) == 1
    assert "snp.report_data_mismatch" in capsys.readouterr().out


def test_test_pki_is_trusted_only_when_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = test_pki(tmp_path / "pki")
    evidence = tmp_path / "report.bin"
    evidence.write_bytes(SimulatedSnp(pki).simulator.evidence(b"\x05" * 64))
    empty = tmp_path / "no-roots"
    base = ["verify", str(evidence), "--family", "snp", "--roots", str(empty), "--offline"]
    assert main([*base, "--json"]) == 1
    assert "snp.no_trust_anchor" in capsys.readouterr().out
    assert main([*base, "--json", "--test-roots", str(pki.roots_dir)]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["claims"]["trust_anchor"] == "test:amd:milan"


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "/nonexistent/evidence.bin", "--family", "snp", "--offline"],
        ["verify", __file__, "--family", "snp", "--at", "yesterday", "--offline"],
        ["verify", __file__, "--family", "snp", "--nonce", "zz", "--offline"],
    ],
)
def test_usage_and_io_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("attestmesh: cli.")


def test_unknown_family_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["verify", __file__, "--family", "quantum"])
    assert exit_.value.code == 2


@pytest.mark.skipif(
    Path("/sys/kernel/config/tsm/report").exists() or Path("/dev/sev-guest").exists(),
    reason="this machine has a TEE interface; the no-hardware path cannot be shown",
)
def test_collector_without_hardware_says_what_it_looked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["collector", "--node", "n1", "--family", "snp"]) == 2
    err = capsys.readouterr().err
    assert "collector.no_source" in err and "/dev/sev-guest" in err
