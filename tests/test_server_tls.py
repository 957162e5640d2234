"""TLS and mutual TLS on a real `cotune serve`, with certificates made by openssl here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from server_helpers import running_server

from cotune.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certificates(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both CA-signed."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=cotune test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=cotune {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
        (directory / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out",
                 f"{name}.pem", cwd=directory)
    return directory


def _model_info(channel: grpc.Channel, token: str):
    return inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
        inference_pb2.GetModelInfoRequest(), metadata=[("authorization", f"Bearer {token}")],
        timeout=10)


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(tmp_path):
    certs = _certificates(tmp_path)
    with running_server(tmp_path, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                        str(certs / "server.key")) as server:
        trusted = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
        with grpc.secure_channel(server.address, trusted) as channel:
            assert _model_info(channel, server.admin_token).vocab_size == 320
        with grpc.insecure_channel(server.address) as channel, \
                pytest.raises(grpc.RpcError) as refused:
            _model_info(channel, server.admin_token)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_signed_by_the_client_ca(tmp_path):
    certs = _certificates(tmp_path)
    ca = (certs / "ca.pem").read_bytes()
    with running_server(tmp_path, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                        str(certs / "server.key"), "--tls-client-ca",
                        str(certs / "ca.pem")) as server:
        with_certificate = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=(certs / "client.key").read_bytes(),
            certificate_chain=(certs / "client.pem").read_bytes())
        with grpc.secure_channel(server.address, with_certificate) as channel:
            assert _model_info(channel, server.admin_token).vocab_size == 320
        without = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(server.address, without) as channel, \
                pytest.raises(grpc.RpcError) as refused:
            _model_info(channel, server.admin_token)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
