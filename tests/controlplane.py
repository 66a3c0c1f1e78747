"""A real Kubernetes control plane for tests, run the way controller-runtime's envtest runs one:
etcd and kube-apiserver (built by scripts/build-control-plane) on free loopback ports, with our own CA
and serving certificate, a service-account signing key, an admin identity and the operator's identity,
RBAC authorization, and our CRDs installed."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kubernetes import client, config

from agentstudio.natsserver import free_port

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_NAMESPACE = "agent-studio"
OPERATOR_SERVICE_ACCOUNT = "agent-studio-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
OPERATOR_RULES = ROOT / "charts" / "agent-studio" / "files" / "operator-rules.yaml"


def binaries() -> dict[str, str]:
    """Paths of kube-apiserver, etcd and helm; builds them on the first run (cached by version)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-control-plane")], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_certs(
    directory: Path,
    addresses: tuple[str, ...] = ("127.0.0.1",),
    names: tuple[str, ...] = ("localhost",),
    clients: tuple[tuple[str, str, str], ...] = (),
) -> None:
    """CA, a serving certificate for `addresses`/`names` signed by it, the service-account key pair,
    and a client certificate `<file>.crt`/`.key` (CN, O) per entry of `clients`."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-studio-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def signed(stem: str, subject: x509.Name, extension: x509.ExtensionType) -> None:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(extension, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(_pem_key(key))

    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    signed(
        "apiserver",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        ),
    )
    for stem, common_name, organization in clients:
        signed(
            stem,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                       x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]),
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
        )
    sa_key = _key()
    (directory / "sa.key").write_bytes(_pem_key(sa_key))
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    """A kubeconfig for one token identity (the file holds the token: it stays in the run's folder)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))
    return path


@dataclass
class ControlPlane:
    directory: Path
    url: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        bins = binaries()
        certs = self.directory / "certs"
        certs.mkdir(parents=True)
        write_certs(certs)
        self.tokens = {"admin": secrets.token_hex(16), "operator": secrets.token_hex(16)}
        (self.directory / "tokens.csv").write_text(
            f'{self.tokens["admin"]},admin,admin,"system:masters"\n'
            f'{self.tokens["operator"]},{OPERATOR_USER},operator-uid,'
            f'"system:serviceaccounts,system:serviceaccounts:{OPERATOR_NAMESPACE}"\n'
        )
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        log = open(self.directory / "control-plane.log", "ab")  # noqa: SIM115 - lives as long as the procs
        self.procs.append(subprocess.Popen(
            [bins["ETCD"], "--data-dir", str(self.directory / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
             "--unsafe-no-fsync", "--log-level", "warn"],
            stdout=log, stderr=log,
        ))
        self._wait(f"http://127.0.0.1:{etcd_port}/health", "etcd")
        self.url = f"https://127.0.0.1:{api_port}"
        self.procs.append(subprocess.Popen(
            [bins["KUBE_APISERVER"], f"--etcd-servers=http://127.0.0.1:{etcd_port}",
             f"--cert-dir={certs}", f"--tls-cert-file={certs / 'apiserver.crt'}",
             f"--tls-private-key-file={certs / 'apiserver.key'}",
             f"--secure-port={api_port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=RBAC",
             f"--token-auth-file={self.directory / 'tokens.csv'}", "--allow-privileged=true",
             "--disable-admission-plugins=ServiceAccount",
             f"--service-account-issuer={self.url}/", f"--service-account-key-file={certs / 'sa.pub'}",
             f"--service-account-signing-key-file={certs / 'sa.key'}"],
            stdout=log, stderr=log,
        ))
        self._wait(f"{self.url}/readyz", "kube-apiserver", token=self.tokens["admin"])
        for identity in self.tokens:
            self.kubeconfig(identity)
        self.install_crds()

    def _wait(self, url: str, what: str, token: str | None = None, timeout: float = 90) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: Any = (
            ssl.create_default_context(cafile=str(self.directory / "certs" / "ca.crt")) if url.startswith("https") else True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    log = self.directory / "control-plane.log"
                    said = log.read_text(errors="replace").splitlines()[-30:]
                    raise RuntimeError(f"{what} exited ({log}):\n" + "\n".join(said))
            try:
                if httpx.get(url, headers=headers, verify=verify, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready at {url}")

    def kubeconfig(self, identity: str) -> Path:
        path = self.directory / f"{identity}.kubeconfig"
        if not path.exists():
            write_kubeconfig(path, self.url, self.directory / "certs" / "ca.crt", self.tokens[identity])
        return path

    def api(self, identity: str = "admin") -> client.ApiClient:
        return config.new_client_from_config(str(self.kubeconfig(identity)))

    def install_crds(self) -> None:
        ext = client.ApiextensionsV1Api(self.api())
        names = []
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            body = yaml.safe_load(path.read_text())
            ext.create_custom_resource_definition(body)
            names.append(body["metadata"]["name"])
        deadline = time.monotonic() + 30
        for name in names:
            while True:
                crd = ext.read_custom_resource_definition(name)
                if any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []):
                    break
                assert time.monotonic() < deadline, f"CRD {name} not established"
                time.sleep(0.1)

    def tenant_namespace(self, name: str) -> None:
        """A namespace with the operator's Role bound to its identity, and the peering object."""
        api = self.api()
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        rbac = client.RbacAuthorizationV1Api(api)
        rules = yaml.safe_load(OPERATOR_RULES.read_text())
        rbac.create_namespaced_role(name, {"metadata": {"name": "agent-studio-operator"}, "rules": rules})
        rbac.create_namespaced_role_binding(name, {
            "metadata": {"name": "agent-studio-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "agent-studio-operator"},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SERVICE_ACCOUNT,
                          "namespace": OPERATOR_NAMESPACE}],
        })
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "kopf.dev", "v1", name, "kopfpeerings", {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                                      "metadata": {"name": "agent-studio"}})

    def requests_served(self, resource: str, verbs: tuple[str, ...], group: str = "", subresource: str = "") -> int:
        """How many requests the API server has answered for `resource`, by its own metrics
        (apiserver_request_total), not by anything the client under test counts."""
        ca = ssl.create_default_context(cafile=str(self.directory / "certs" / "ca.crt"))
        text = httpx.get(f"{self.url}/metrics", verify=ca,
                         headers={"Authorization": f"Bearer {self.tokens['admin']}"}).text
        wanted = {f'group="{group}"', f'resource="{resource}"', f'subresource="{subresource}"'}
        total = 0.0
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels, _, value = line.rpartition(" ")
            found = set(labels[labels.index("{") + 1:labels.rindex("}")].split(","))
            if wanted <= found and any(f'verb="{v}"' in found for v in verbs):
                total += float(value)
        return int(total)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def start(directory: Path | None = None) -> ControlPlane:
    cp = ControlPlane(directory or Path(tempfile.mkdtemp(prefix="controlplane-")))
    try:
        cp.start()
    except BaseException:
        cp.stop()
        raise
    return cp


if __name__ == "__main__":  # `python tests/controlplane.py`: a control plane to poke at by hand
    plane = start()
    print(f"KUBECONFIG={plane.kubeconfig('admin')}  (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        plane.stop()
    os._exit(0)
