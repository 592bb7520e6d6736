"""The torch process group of a Ray Train run, with its listeners on the node's cluster address only.

Ray Train's own setup (``ray.train.torch.config._TorchBackend``) lets rank 0's ``TCPStore`` listen on every
interface (``*:<port>``, IPv4 and IPv6): torch binds the store's server to the wildcard address and uses
``MASTER_ADDR`` only to connect. Here rank 0 opens the listening socket itself, bound to the address Ray uses
for its node (``127.0.0.1`` on a one-machine cluster, the node's cluster IP on a real one), and hands it to
``TCPStore(master_listen_fd=...)``; the other ranks connect as clients and every rank calls
``init_process_group(store=...)``. Gloo and NCCL open their own listeners on the interface named by
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``: set to that address's interface unless you chose one.
``MPLUG2_RENDEZVOUS_HOST`` overrides the bind address (``0.0.0.0`` only if you want every interface).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend, _set_torch_distributed_env_vars

log = logging.getLogger(__name__)

HOST_ENV = "MPLUG2_RENDEZVOUS_HOST"
_listener: socket.socket | None = None   # rank 0's store socket, kept open until the store owns it


def ray_node_ip() -> str:
    """The address Ray knows this node by (127.0.0.1 on a one-machine cluster)."""
    import ray.util

    return ray.util.get_node_ip_address()


def bind_host() -> str:
    """``$MPLUG2_RENDEZVOUS_HOST``, else :func:`ray_node_ip`."""
    return os.environ.get(HOST_ENV) or ray_node_ip()


def interface_of(address: str) -> str | None:
    """The name of the network interface that carries IPv4 ``address`` (Linux), or None."""
    try:
        wanted = socket.inet_aton(address)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                # SIOCGIFADDR: the interface's IPv4 address (bytes 20..24 of the returned ifreq)
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if raw[20:24] == wanted:
                return name
    return None


def open_store_listener() -> tuple[str, int]:
    """Rank 0: listen on ``(bind_host(), free port)``; returns the address the other ranks connect to."""
    global _listener
    host = bind_host()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(socket.SOMAXCONN)
    _listener = sock
    connect = ray_node_ip() if host in ("0.0.0.0", "::") else host
    return connect, sock.getsockname()[1]


def init_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: int) -> None:
    """Every rank: the store (rank 0 serves it on its bound socket) and the process group on top of it."""
    global _listener
    import torch.distributed as dist

    interface = interface_of(addr)
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        assert _listener is not None, "open_store_listener() must run on rank 0 first"
        fd = _listener.detach()                 # the store owns the socket from here on
        _listener = None
        store = dist.TCPStore(addr, port, world_size, True, timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "BoundTorchConfig") -> None:
        import ray

        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus else "gloo")     # Ray's default choice
        addr, port = worker_group.execute_single(0, open_store_listener)
        worker_group.execute(_set_torch_distributed_env_vars)     # LOCAL_RANK, WORLD_SIZE, ... as Ray does
        ray.get([worker_group.execute_single_async(i, init_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), addr=addr, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])
        log.info("process group (%s) of %d workers, store on %s:%d", backend, len(worker_group), addr, port)


class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on the node's cluster address only (see module doc)."""

    @property
    def backend_cls(self):
        return _BoundTorchBackend
