"""Small tmpfs mounts for disk-full and read-only store tests (Linux, needs CAP_SYS_ADMIN).

A :class:`Tmpfs` is a real filesystem of a fixed size: writing past it fails with ENOSPC, and
remounted read-only it fails with EROFS even for root (who ignores permission bits, so a
``chmod``-ed directory proves nothing when the tests run as root).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

__all__ = ["MountNotPermitted", "Tmpfs"]


class MountNotPermitted(RuntimeError):
    """This process may not mount a tmpfs here (no CAP_SYS_ADMIN, a container, no mount)."""


class Tmpfs:
    """A tmpfs of ``size`` bytes mounted at ``path`` (created if missing)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.mounted = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        result = _run("mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs",
                      str(self.path))  # fmt: skip
        if result.returncode != 0:
            raise MountNotPermitted(
                f"cannot mount a tmpfs at {self.path}: {result.stderr.strip() or result.returncode}"
            )
        self.mounted = True

    def remount(self, *, read_only: bool) -> None:
        """Switch between read-only and read-write, keeping the contents."""
        mode = "ro" if read_only else "rw"
        result = _run("mount", "-o", f"remount,{mode}", str(self.path))
        if result.returncode != 0:
            raise MountNotPermitted(f"cannot remount {self.path} {mode}: {result.stderr.strip()}")

    def unmount(self) -> None:
        if not self.mounted:
            return
        if _run("umount", str(self.path)).returncode != 0:
            _run("umount", "-l", str(self.path))  # busy: detach now, free when the last fd closes
        self.mounted = False

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int, name: str = "filler") -> Path:
        """Write a file that leaves about ``leave`` bytes free; returns its path."""
        filler = self.path / name
        with open(filler, "wb") as f:
            while self.free_bytes() > leave:
                chunk = min(1 << 20, self.free_bytes() - leave)
                try:
                    f.write(b"\0" * max(chunk, 4096))
                    f.flush()
                except OSError:
                    break
        return filler

    def __enter__(self) -> Tmpfs:
        self.mount()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self.remount(read_only=False)
        self.unmount()


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(command, 1, "", str(exc))
