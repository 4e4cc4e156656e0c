"""The client commands' ``--tls-*`` flags: what they turn into and how bad ones are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recsys.cli import build_parser, client_tls, main
from recsys.errors import UserFacingError


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN X-----\n")
    return files


def parsed(command: str, *flags: str):
    extra = ["--user", "1"] if command == "recommend" else []
    return build_parser().parse_args([command, *extra, *flags])


@pytest.mark.parametrize("command", ["recommend", "loadtest"])
def test_no_flags_means_plaintext(command):
    assert client_tls(parsed(command)) is None


@pytest.mark.parametrize("command", ["recommend", "loadtest"])
def test_flags_become_client_tls_settings(command, pki):
    only_ca = client_tls(parsed(command, "--tls-ca", str(pki.ca)))
    assert (only_ca.ca_file, only_ca.cert_file, only_ca.key_file) == (pki.ca, None, None)
    mutual = client_tls(
        parsed(command, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
               "--tls-key", str(pki.client_key))
    )  # fmt: skip
    assert (mutual.ca_file, mutual.cert_file, mutual.key_file) == (
        pki.ca, pki.client_cert, pki.client_key
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert needs --tls-key"),
        (["--tls-ca", "{ca}", "--tls-key", "{key}"], "--tls-key needs --tls-cert"),
        (["--tls-ca", "{missing}"], "--tls-ca: {missing}: no such file or directory"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "--tls-key: {missing}"),
        # Was "tls.ca_file: ...", a setting no command line has.
        (["--tls-ca", "{ca}"], "--tls-ca: {ca}: holds no PEM certificate"),
        (["--tls-cert", "{client_cert}", "--tls-key", "{key}"], "--tls-key: {key}: holds no"),
        (
            ["--tls-cert", "{client_cert}", "--tls-key", "{server_key}"],
            "--tls-key: {server_key}: not the key of --tls-cert {client_cert}",
        ),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(flags, message, pem, pki, tmp_path):
    names = {
        **{k: str(v) for k, v in pem.items()},
        "missing": str(tmp_path / "nope.pem"),
        "client_cert": str(pki.client_cert),
        "server_key": str(pki.server_key),
    }
    with pytest.raises(UserFacingError, match=re.escape(message.format(**names))):
        client_tls(parsed("loadtest", *(f.format(**names) for f in flags)))


def test_cli_reports_a_bad_flag_and_exits_2(pem, capsys):
    code = main(["recommend", "--user", "1", "--target", "127.0.0.1:1",
                 "--tls-cert", str(pem["cert"])])  # fmt: skip
    assert code == 2
    assert "recsys recommend: --tls-cert needs --tls-key" in capsys.readouterr().err
