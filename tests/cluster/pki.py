"""A throw-away certificate authority for the test cluster, made with openssl.

Every component authenticates as it would in a real cluster: the API server and
the test kubelet serve TLS certificates signed by this CA, and clients present
client certificates whose subject names the user (CN) and groups (O).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is not installed: apt-get install openssl")
    subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)


class CertificateAuthority:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert = self.directory / "ca.crt"
        self.key = self.directory / "ca.key"
        if not self.cert.exists():
            _openssl("req", "-x509", *EC_KEY, "-keyout", str(self.key), "-out", str(self.cert),
                     "-days", "3650", "-subj", "/CN=kubetune-test-ca",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")

    def _issue(self, name: str, subject: str, extensions: list[str]) -> KeyPair:
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        addext = [arg for ext in extensions for arg in ("-addext", ext)]
        _openssl("req", "-x509", *EC_KEY, "-keyout", str(pair.key), "-out", str(pair.cert),
                 "-CA", str(self.cert), "-CAkey", str(self.key), "-days", "365",
                 "-subj", subject, "-addext", "basicConstraints=critical,CA:FALSE",
                 "-addext", "keyUsage=critical,digitalSignature,keyEncipherment", *addext)
        return pair

    def client(self, name: str, user: str, groups: tuple[str, ...] = ()) -> KeyPair:
        """A client certificate: Kubernetes reads the user from CN, groups from O."""
        subject = "".join(f"/O={g}" for g in groups) + f"/CN={user}"
        return self._issue(name, subject, ["extendedKeyUsage=clientAuth"])

    def server(self, name: str, common_name: str, hosts: tuple[str, ...]) -> KeyPair:
        """A serving certificate valid for the given IP addresses and DNS names."""
        sans = ",".join(
            f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
        )
        return self._issue(name, f"/CN={common_name}",
                           ["extendedKeyUsage=serverAuth", f"subjectAltName={sans}"])


def rsa_key_pair(private_key: Path, public_key: Path) -> None:
    """The service-account token signing key (private) and verification key (public)."""
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(private_key))
    _openssl("pkey", "-in", str(private_key), "-pubout", "-out", str(public_key))
