"""Makes development certificates for worker TLS / mutual TLS (not for production).

Writes, into OUT (default deploy/certs): ca.pem/ca.key (a throwaway CA), server.pem/
server.key (for every worker; names: localhost, 127.0.0.1 and any --host), client.pem/
client.key (for drivers and upstream workers under mutual TLS). Every worker of a chain
is both a server and a client, so with --mtls give each worker server.pem *and* the CA;
its outgoing link presents the same certificate, which is why the server certificate
is also valid for client authentication.

    python scripts/make_dev_certs.py --out deploy/certs --host worker-a.example --host 10.0.0.5
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(out: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path = out / f"{name}.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make(out: Path, hosts: list[str], days: int = 30) -> None:
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedff development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(out, "ca", ca, ca_key)
    for name, usages in (("server", [ExtendedKeyUsageOID.SERVER_AUTH,
                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                         ("client", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = _key()
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                               f"fedff {name}")]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if name == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(_names(hosts)),
                                            critical=False)
        _write(out, name, builder.sign(ca_key, hashes.SHA256()), key)


def supernode_keys(out: Path, count: int) -> None:
    """OpenSSH EC key pairs that Flower SuperNodes authenticate with (node allow-listing):
    supernode<i> (private, for `flower-supernode --auth-supernode-private-key`) and
    supernode<i>.pub (for `flwr supernode register`)."""
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        (out / f"supernode{i}").write_bytes(private)
        (out / f"supernode{i}").chmod(0o600)
        (out / f"supernode{i}.pub").write_bytes(public + b"\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("deploy/certs"))
    ap.add_argument("--host", action="append", default=[],
                    help="extra name or IP the workers are reached at (repeatable)")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--supernode-keys", type=int, default=0, metavar="N",
                    help="also write N SuperNode authentication key pairs (federation)")
    args = ap.parse_args()
    make(args.out, ["localhost", "127.0.0.1", *args.host], args.days)
    supernode_keys(args.out, args.supernode_keys)
    print(f"wrote ca, server and client certificates"
          f"{f' and {args.supernode_keys} SuperNode key pairs' if args.supernode_keys else ''}"
          f" to {args.out}")


if __name__ == "__main__":
    main()
