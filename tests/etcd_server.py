"""A real etcd for tests and benchmarks: `/usr/bin/etcd` on 127.0.0.1 with free
client and peer ports and a temporary data dir, plus `TcpProxy`, a loopback
TCP relay that can cut the provider off from a live etcd (a partition, while
the test keeps changing the data directly).

`stop()` is SIGKILL ("the backend died"); `start()` again reuses the same ports
and data dir ("the backend came back"). Data is changed with `etcdctl`, a
client independent of the one under test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
MISSING = (
    "etcd is not installed ({path}); `make test` installs it "
    "(the Makefile runs `.ci/ensure-packages etcd:etcd-server`)"
)

# etcd 3.4 refuses to start on architectures it does not officially support
# unless told which one it is running on.
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class EtcdMissingError(RuntimeError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for an etcd that requires TLS and client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def generate(cls, folder: Path) -> TlsFiles:
        """A throwaway CA, a server certificate for 127.0.0.1 and a client
        certificate, with openssl (EC P-256, valid one day)."""
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("openssl is not installed; `make test` installs it")
        folder.mkdir(parents=True, exist_ok=True)
        key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

        run("req", "-x509", *key_args, "-keyout", "ca.key", "-out", "ca.pem",
            "-subj", "/CN=resolverd-test-ca", "-days", "1")  # fmt: skip
        for name, ext in (
            ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            (folder / f"{name}.ext").write_text(ext + "\n")
            run("req", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=resolverd-test-{name}")  # fmt: skip
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                "-extfile", f"{name}.ext")  # fmt: skip
        return cls(
            ca=folder / "ca.pem",
            server_cert=folder / "server.pem",
            server_key=folder / "server.key",
            client_cert=folder / "client.pem",
            client_key=folder / "client.key",
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One single-member etcd cluster on loopback."""

    def __init__(
        self,
        *,
        extra_args: tuple[str, ...] = (),
        tmp_root: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        for path in (ETCD, ETCDCTL):
            if not os.access(path, os.X_OK):
                raise EtcdMissingError(MISSING.format(path=path))
        self.dir = Path(tempfile.mkdtemp(prefix="resolverd-etcd-", dir=tmp_root))
        self.data_dir = self.dir / "data"
        self.log_file = self.dir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.extra_args = extra_args
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def _command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            ETCD,
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # One member on loopback: elect it at once instead of after ~1 s.
            "--heartbeat-interval=10",
            "--election-timeout=100",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            f"--cert-file={self.tls.server_cert}",
            f"--key-file={self.tls.server_key}",
            f"--trusted-ca-file={self.tls.ca}",
            "--client-cert-auth",
        ]

    def start(self, *, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        env = dict(os.environ)
        arch = _GOARCH.get(platform.machine().lower(), platform.machine().lower())
        if arch != "amd64":
            env.setdefault("ETCD_UNSUPPORTED_ARCH", arch)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"etcd not healthy after {timeout}s: {self.log_tail()}")

    def healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        try:
            url = f"{self.client_url}/health"
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """SIGKILL: the backend dies without a goodbye."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- data, through etcdctl --------------------------------------------------

    def ctl(self, *args: str, stdin: str | None = None) -> str:
        env = {**os.environ, "ETCDCTL_API": "3"}
        tls = []
        if self.tls is not None:
            tls = [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={self.client_url}", "--dial-timeout=3s", *tls, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=20,
        )
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def put(self, key: str, value: str | dict[str, Any], *, lease: int | None = None) -> int:
        """Returns the revision of the put."""
        text = value if isinstance(value, str) else json.dumps(value)
        args = ["put", "-w", "json"]
        if lease is not None:
            args.append(f"--lease={lease:x}")
        # `--` so a value starting with '-' is not an option.
        out = self.ctl(*args, "--", key, text)
        return int(json.loads(out)["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> int:
        out = self.ctl("del", "-w", "json", *(["--prefix"] if prefix else []), key)
        return int(json.loads(out)["header"]["revision"])

    def get_prefix(self, prefix: str) -> dict[str, str]:
        out = json.loads(self.ctl("get", "-w", "json", "--prefix", prefix))
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in out.get("kvs", [])
        }

    def revision(self) -> int:
        out = json.loads(self.ctl("endpoint", "status", "-w", "json"))
        return int(out[0]["Status"]["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.ctl("compaction", "--physical", str(revision))

    def grant(self, ttl: int) -> int:
        out = self.ctl("lease", "grant", str(ttl), "-w", "json")
        return int(json.loads(out)["ID"])


class TcpProxy:
    """A loopback TCP relay to `target` that the test can cut and heal.

    `cut()` closes every relayed connection and stops listening, so the
    client sees its stream reset and its reconnects refused, while the
    backend stays up; `heal()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.heal()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def heal(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                # RST rather than FIN: the peer sees a reset connection at once.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
