"""TLS and mutual TLS on a real `cotune serve`, with certificates made by openssl here."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import grpc
import httpx2 as httpx
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


def _https_health(server, certs: Path, client_certificate: bool) -> httpx.Response:
    """GET /health of the HTTP front (its URL says https), trusting the test CA."""
    context = ssl.create_default_context(cafile=certs / "ca.pem")
    if client_certificate:
        context.load_cert_chain(certs / "client.pem", certs / "client.key")
    url = server.openai_url()
    assert url.startswith("https://"), url
    return httpx.get(url.removesuffix("/v1") + "/health", verify=context, timeout=10)


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(tmp_path):
    certs = _certificates(tmp_path)
    with running_server(tmp_path, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                        str(certs / "server.key"), "--http-port", "0") as server:
        trusted = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
        with grpc.secure_channel(server.address, trusted) as channel:
            assert _model_info(channel, server.admin_token).vocab_size == 320
        with grpc.insecure_channel(server.address) as channel, \
                pytest.raises(grpc.RpcError) as refused:
            _model_info(channel, server.admin_token)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # the HTTP front serves the same certificate
        assert _https_health(server, certs, client_certificate=False).status_code == 200


def test_mutual_tls_needs_a_client_certificate_signed_by_the_client_ca(tmp_path):
    certs = _certificates(tmp_path)
    ca = (certs / "ca.pem").read_bytes()
    with running_server(tmp_path, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                        str(certs / "server.key"), "--tls-client-ca",
                        str(certs / "ca.pem"), "--http-port", "0") as server:
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
        # and so does the HTTP front: no TLS session without a client certificate
        assert _https_health(server, certs, client_certificate=True).status_code == 200
        # (TLS 1.3: the server checks the certificate after the client's handshake, so the
        # refusal shows as a closed connection or a failed handshake, as timing has it)
        with pytest.raises(httpx.TransportError):
            _https_health(server, certs, client_certificate=False)
