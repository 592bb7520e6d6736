"""What a run leaves behind on the machine: listening sockets of its processes, files holding a secret.

Linux only (``/proc``); psutil is not a dependency of this project.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            table[int(entry)] = (int(fields[1]), int(fields[3]), cmd.strip())
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(root: int) -> dict[int, str]:
    """``root`` and every process below it, with their command lines."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            out[pid] = table[pid][2]
        stack.extend(children.get(pid, []))
    return out


def _decode(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:   # four little-endian 32-bit words
        return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def listening_table(pid: int | str = "self") -> dict[str, tuple[str, int]]:
    """Socket inode -> ``(address, port)`` of every TCP socket in LISTEN state in ``pid``'s network namespace
    (IPv4 and IPv6). Read once per sample: every process of a run shares the namespace, and the table is long."""
    out = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A":     # 0A = LISTEN
                        out[cols[9]] = _decode(cols[1], v6)
        except OSError:
            continue
    return out


def listening_sockets(pid: int, table: dict[str, tuple[str, int]] | None = None) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket ``pid`` holds in LISTEN state (``table``: a
    :func:`listening_table` of its namespace, read by the caller for many processes at once)."""
    try:
        table = listening_table(pid) if table is None else table
        out = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in table:
                out.append(table[target[8:-1]])
        return out
    except OSError:      # the process ended meanwhile
        return []


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def files_containing(roots: list[Path], needle: str, skip: set[Path] = frozenset()) -> list[str]:
    """Every regular file under ``roots`` whose bytes contain ``needle``."""
    data = needle.encode()
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path in skip or path.is_symlink() or not path.is_file():
                    continue
                try:
                    if data in path.read_bytes():
                        hits.append(str(path))
                except OSError:
                    continue
    return hits


SEMAPHORE_DIR = Path("/dev/shm")


def named_semaphores() -> set[Path]:
    """multiprocessing's named POSIX semaphores (``sem.mp-*``). A spawn-context pool's queues hold five; its
    resource tracker unlinks them at exit, so a run killed with its whole process group leaves them behind."""
    return set(SEMAPHORE_DIR.glob("sem.mp-*"))


def unmapped(paths: set[Path]) -> list[Path]:
    """Those of ``paths`` that still exist and that no process has open (an open named semaphore is mapped into
    its holders' memory, ``/proc/<pid>/maps``): left behind, not in use."""
    mapped: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.split()[-1] for line in f if "/dev/shm/sem." in line)
        except OSError:
            continue
    return sorted(p for p in paths if p.exists() and str(p) not in mapped)
