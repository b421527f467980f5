"""Debian's PgBouncer and nginx, run by tests on free loopback ports. Never mocked: a missing
binary fails the run in CI (.ci/run installs them) and skips elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from chat.embedded import EmbeddedPostgres
from tests.servers import free_port

PGBOUNCER = Path("/usr/sbin/pgbouncer")
NGINX = Path("/usr/sbin/nginx")
REPO = Path(__file__).resolve().parent.parent


def need(binary: Path, package: str) -> None:
    if binary.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{binary} is missing in CI (.ci/run installs it with apt-get install {package})")
    pytest.skip(f"{binary} is not installed (apt-get install {package})")


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not open in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class PgBouncer:
    """PgBouncer in transaction mode in front of the Postgres at `admin_url` (any database on it).

    It refuses to run as root, so as root it runs as the embedded Postgres's unprivileged account.
    Its pool is smaller than the app's, so server connections are shared between clients the way
    they are in production."""

    def __init__(self, admin_url: str, folder: Path, *, pool_size: int = 4) -> None:
        need(PGBOUNCER, "pgbouncer")
        url = make_url(admin_url)
        host = url.query.get("host") or url.host or "127.0.0.1"
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "pgbouncer.log"
        users = folder / "users.txt"
        users.write_text(f'"{url.username or "postgres"}" "{url.password or ""}"\n')
        ini = folder / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={host} port={url.port or 5432} user={url.username or 'postgres'}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {users}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n"
            f"logfile = {self.log_path}\n"
        )
        self.log_path.touch()
        account = EmbeddedPostgres(folder).account  # None unless we are root
        if account is not None:
            for path in (folder, users, ini, self.log_path):
                os.chown(path, account.pw_uid, account.pw_gid)

        def demote() -> None:
            if account is not None:
                os.setgroups([])
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)

        self.proc = subprocess.Popen(
            [str(PGBOUNCER), str(ini)], preexec_fn=demote, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd="/"
        )
        wait_port(self.port, self.proc, self.log_path)

    def url(self, database_url: str) -> str:
        """`database_url`'s database, through the pooler."""
        url = make_url(database_url)
        return f"postgresql+asyncpg://{url.username or 'postgres'}@127.0.0.1:{self.port}/{url.database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc, signal.SIGINT)  # safe shutdown: waits for running queries, not for clients


class Nginx:
    """nginx with the shipped deploy/nginx.conf, its ports and upstreams filled in, nothing else."""

    def __init__(self, folder: Path, upstreams: list[int]) -> None:
        need(NGINX, "nginx")
        self.port = free_port()
        self.tls_port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)  # as root, the workers run as nobody and keep temp files here
        self.folder = folder
        self.access_log = folder / "access.log"
        self.error_log = folder / "error.log"
        self.conf = folder / "nginx.conf"
        self.cert, self.key = folder / "chat.pem", folder / "chat.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
             "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.render(upstreams)
        self.proc = subprocess.Popen(
            [str(NGINX), "-p", str(folder), "-c", str(self.conf), "-e", str(self.error_log), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, self.proc, self.error_log)

    def render(self, upstreams: list[int]) -> None:
        """The shipped file with the test's ports and paths: only those are replaced."""
        shipped = (REPO / "deploy" / "nginx.conf").read_text()
        servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;\n" for port in upstreams)
        replacements = {
            "    server 127.0.0.1:8001 max_fails=1 fail_timeout=2s;\n": servers,
            "    server 127.0.0.1:8002 max_fails=1 fail_timeout=2s;\n": "",
            "listen 80;": f"listen 127.0.0.1:{self.port};",
            "listen 443 ssl;": f"listen 127.0.0.1:{self.tls_port} ssl;",
            "/etc/ssl/certs/chat.pem": str(self.cert),
            "/etc/ssl/private/chat.key": str(self.key),
            "/var/log/nginx/chat-access.log": str(self.access_log),
            "/var/log/nginx/chat-error.log": str(self.error_log),
        }
        text = shipped
        for old, new in replacements.items():
            assert text.count(old) == 1, f"deploy/nginx.conf changed: {old!r}"
            text = text.replace(old, new)
        # The parts of a full nginx.conf around the shipped http-level blocks.
        self.conf.write_text(
            f"pid {self.folder / 'nginx.pid'};\nerror_log {self.error_log};\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"  client_body_temp_path {self.folder / 'body'};\n  proxy_temp_path {self.folder / 'proxy'};\n"
            f"  fastcgi_temp_path {self.folder / 'fcgi'};\n  uwsgi_temp_path {self.folder / 'uwsgi'};\n"
            f"  scgi_temp_path {self.folder / 'scgi'};\n"
            f"{text}\n}}\n"
        )

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def routes_to(self, port: int, timeout: float = 30.0) -> None:
        """Wait until nginx sends requests to this upstream again (it skips one that failed for
        fail_timeout): probe /readyz until the access log shows one answered by it."""
        async with asyncio.timeout(timeout), httpx.AsyncClient(base_url=self.http) as http:
            for probe in itertools.count():
                agent = f"routes-to-probe-{port}-{probe}"
                await http.get("/readyz", headers={"User-Agent": agent})
                while not (line := next((x for x in self._access_lines() if agent in x), "")):
                    await asyncio.sleep(0.02)  # nginx logs after it answers
                if line.endswith(f"upstream=127.0.0.1:{port}") and '" 200 ' in line:
                    return
                await asyncio.sleep(0.1)

    def _access_lines(self) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines()

    def logs(self) -> str:
        return self.access_log.read_text(errors="replace") + self.error_log.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc, signal.SIGQUIT)  # graceful: finish what is in flight
