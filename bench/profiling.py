"""py-spy on a server process during a measured window, and a summary of where its time went."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 100  # samples per second


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float | None, out: Path) -> subprocess.Popen[bytes] | None:
    """Record `pid` for `seconds` (None: until stop()), with non-blocking sampling (the server is
    not paused), as collapsed stacks (`--format raw`: flamegraph.pl, inferno or speedscope read it)."""
    exe = py_spy()
    if exe is None:
        return None
    args = [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking", "--format", "raw"]
    if seconds is not None:
        args += ["--duration", str(max(1, round(seconds)))]
    return subprocess.Popen([*args, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(spy: subprocess.Popen[bytes]) -> None:
    """End a recording started without a duration; py-spy writes its file on SIGINT."""
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


def collect(spy: subprocess.Popen[bytes] | None, raw: Path | None, seconds: float) -> dict[str, Any] | None:
    """End a recording started without a duration, and its summary over `seconds` with the file it
    is in (None: nothing was recorded)."""
    if spy is None or raw is None:
        return None
    stop(spy)
    return {"file": str(raw), **summarize(raw, seconds)} if raw.exists() else None


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _where(frame: str) -> tuple[str, str]:
    """(function, package) of one collapsed-stack frame like `send (uvicorn/protocols/x.py:12)`."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), "?"
    func, file = match.group("func"), match.group("file")
    parts = file.replace("\\", "/").split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "main" in parts and "chat" in parts:
        parts = parts[parts.index("chat") :]
    elif "python3.11" in parts:
        parts = ["stdlib", *parts[parts.index("python3.11") + 1 :]]
    package = "/".join(parts[:2]) if parts and parts[0] in ("stdlib", "uvicorn", "websockets", "chat") else parts[0]
    return f"{func} ({'/'.join(parts[-2:])})", package


def summarize(raw: Path, seconds: float, top: int = 20) -> dict[str, Any]:
    """Busy share of the process, and the top functions (self and inclusive) and packages."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        leaf, package = _where(frames[-1])
        self_time[leaf] += count
        packages[package] += count
        for name in {_where(f)[0] for f in frames}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "busy_percent": round(100 * total / (RATE * seconds), 1) if seconds else None,
        "self": share(self_time),
        "inclusive": share(inclusive),
        "packages": share(packages),
    }
