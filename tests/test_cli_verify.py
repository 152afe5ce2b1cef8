"""`attestmesh verify`: the output and exit-code contract of DESIGN.md §6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import MAX_COLLATERAL_FILES, MAX_EVIDENCE_BYTES, main
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
    empty.mkdir()
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


@pytest.mark.parametrize("flag", ["--roots", "--test-roots", "--collateral"])
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_named_directory_must_be_a_directory(
    flag: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing or non-directory trust/collateral directory is a usage error (2), not a
    verdict about the evidence (1), and nothing is printed as if a verdict had been reached."""
    target = tmp_path / "there"
    expected = "no such directory"
    if kind == "file":
        target.write_bytes(b"not a directory")
        expected = "is not a directory"
    roots = tmp_path / "roots"
    roots.mkdir()
    args = ["verify", __file__, "--family", "tdx", "--offline", "--roots", str(roots)]
    assert main([*args, flag, str(target), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"attestmesh: cli.not_a_directory: {flag} {target}: {expected}\n"


def test_roots_from_the_environment_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = test_pki(tmp_path / "pki")
    evidence = tmp_path / "report.bin"
    evidence.write_bytes(SimulatedSnp(pki).simulator.evidence(b"\x05" * 64))
    base = ["verify", str(evidence), "--family", "snp", "--offline", "--json"]
    monkeypatch.setenv("ATTESTMESH_ROOTS", str(tmp_path / "gone"))
    assert main(base) == 2
    assert "cli.not_a_directory: ATTESTMESH_ROOTS" in capsys.readouterr().err
    # The default directory is only filled by `roots fetch`: its absence is no usage error,
    # the verdict says that nothing anchors the evidence.
    monkeypatch.delenv("ATTESTMESH_ROOTS")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert main(base) == 1
    assert "snp.no_trust_anchor" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("evidence_is_dir", "cli.unreadable"),
        ("roots_name_too_long", "cli.unreadable"),
        ("collateral_file_too_large", "cli.too_large"),
        ("collateral_too_many_files", "cli.too_large"),
        ("malformed_root", "trust.malformed"),
    ],
)
def test_every_io_error_of_verify_exits_2(
    setup: str, code: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence, roots, collateral = Path(__file__), tmp_path / "roots", tmp_path / "collateral"
    roots.mkdir()
    collateral.mkdir()
    if setup == "evidence_is_dir":
        evidence = tmp_path
    elif setup == "roots_name_too_long":
        roots = tmp_path / ("x" * 300)  # longer than NAME_MAX: stat fails, even as root
    elif setup == "collateral_file_too_large":
        (collateral / "tcb_info.json").write_bytes(b"{" * (MAX_EVIDENCE_BYTES + 1))
    elif setup == "collateral_too_many_files":
        for index in range(MAX_COLLATERAL_FILES + 1):
            (collateral / f"f{index}").write_bytes(b"x")
    else:
        (roots / "intel").mkdir()
        (roots / "intel" / "sgx_root_ca.pem").write_bytes(b"not PEM")
    args = ["verify", str(evidence), "--family", "tdx", "--offline", "--roots", str(roots)]
    assert main([*args, "--collateral", str(collateral)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"attestmesh: {code}:"), err


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
