"""Network namespaces for tests: a gateway namespace with leaf namespaces on veth links.

Rules: every namespace name carries a per-run id (namespaces are global on a host); interfaces
are created inside their namespaces, never in the host's own; addresses (ULA `fd00:…`, `10.…`)
exist only in the namespaces. `Lab.close()` deletes every namespace it made, which removes their
interfaces and nftables tables with them. A thread enters a namespace with setns(2) (`inside()`);
sockets made there stay in that namespace whatever thread uses them later.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    probe = f"ci-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """The calling thread is in network namespace `namespace` for the block."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def run(*command: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Host:
    """A namespace with one address per family (a leaf, or the gateway on one link)."""

    name: str
    ns: str
    v6: str
    v4: str
    mac: str = ""


@dataclass
class Link:
    """One routed link of the gateway: its interface there and its addresses."""

    ifname: str
    v6: str
    v4: str
    index: int


@dataclass
class Lab:
    """A gateway namespace and its leaves. `link()` adds a routed link (optionally a bridge for
    several leaves), `leaf()` a namespace on it."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)
    leaves: dict[str, Host] = field(default_factory=dict)

    def ns(self, name: str) -> str:
        return f"ci-{self.run_id}-{name}"

    @property
    def gw(self) -> str:
        return self.ns("gw")

    def exec(self, ns: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", ns, *command, check=check)

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """nft in the gateway namespace."""
        return self.exec(self.gw, "nft", *args, check=check)

    def add_namespace(self, name: str, *, forwarding: bool = False) -> str:
        ns = self.ns(name)
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        settings = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.default.accept_ra=0",
        ]
        if forwarding:
            settings += ["net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1"]
        self.exec(ns, "sysctl", "-q", "-w", *settings)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def start(self) -> None:
        self.add_namespace("gw", forwarding=True)

    def link(self, ifname: str, index: int, *, bridge: bool = False) -> Link:
        """A link `fd00:ab:0:<index>::/64`, `10.77.<index>.0/24`; the gateway is `::1` / `.1`."""
        link = Link(ifname, f"fd00:ab:0:{index:x}::1", f"10.77.{index}.1", index)
        if bridge:
            run("ip", "-n", self.gw, "link", "add", ifname, "type", "bridge", "mcast_snooping", "0")
            run("ip", "-n", self.gw, "link", "set", ifname, "up")
            self._address(self.gw, ifname, link.v6, link.v4)
        self.links[ifname] = link
        return link

    def leaf(self, name: str, link: Link, host: int, mac: str) -> Host:
        """A leaf namespace on `link` (`::<host>` / `.<host>`), default routes via the gateway.
        On a bridge link, the gateway end is a bridge port named `<bridge><host>`."""
        ns = self.add_namespace(name)
        bridged = self._is_bridge(link.ifname)
        gw_end = f"{link.ifname[:10]}p{host}" if bridged else link.ifname
        run(
            "ip", "link", "add", "name", gw_end, "netns", self.gw, "type", "veth",
            "peer", "name", "eth0", "netns", ns,
        )  # fmt: skip
        run("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        if bridged:
            run("ip", "-n", self.gw, "link", "set", gw_end, "master", link.ifname)
        else:
            self._address(self.gw, gw_end, link.v6, link.v4)
        run("ip", "-n", self.gw, "link", "set", gw_end, "up")
        v6, v4 = f"fd00:ab:0:{link.index:x}::{host:x}", f"10.77.{link.index}.{host}"
        self._address(ns, "eth0", v6, v4)
        run("ip", "-n", ns, "-6", "route", "add", "default", "via", link.v6)
        run("ip", "-n", ns, "route", "add", "default", "via", link.v4)
        leaf = Host(name, ns, v6, v4, mac)
        self.leaves[name] = leaf
        return leaf

    def route_behind(self, leaf: Host, v6: str, v4: str) -> tuple[str, str]:
        """Gives `leaf` a second network behind it (`v6`/64 and `v4`/20, its host `.5`), routed
        by the gateway through it: e.g. a staff network beyond the uplink. Its host addresses."""
        host6, host4 = v6.replace("::/64", "::5"), v4.rsplit(".", 1)[0] + ".5"
        run("ip", "-n", leaf.ns, "-6", "addr", "add", f"{host6}/128", "dev", "lo", "nodad")
        run("ip", "-n", leaf.ns, "addr", "add", f"{host4}/32", "dev", "lo")
        run("ip", "-n", self.gw, "-6", "route", "add", v6, "via", leaf.v6)
        run("ip", "-n", self.gw, "route", "add", v4, "via", leaf.v4)
        return host6, host4

    def _is_bridge(self, ifname: str) -> bool:
        shown = run("ip", "-n", self.gw, "-d", "link", "show", ifname, check=False)
        return shown.returncode == 0 and "bridge " in shown.stdout

    @staticmethod
    def _address(ns: str, ifname: str, v6: str, v4: str) -> None:
        run("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad")
        run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", ifname)

    def nft_wrapper(self, folder: Path, ns: str | None = None) -> Path:
        """An executable that runs nft in the gateway namespace (an agent's `nft_path`)."""
        path = folder / f"nft-{ns or self.gw}"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {ns or self.gw} nft "$@"\n')
        path.chmod(0o755)
        return path

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


# -- traffic -------------------------------------------------------------------------------------


class Listeners:
    """TCP listeners in namespaces (one socket per family) that accept and close at once."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def listen(self, ns: str, port: int) -> None:
        with inside(ns):
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            v6.bind(("::", port))
            v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            v4.bind(("0.0.0.0", port))
        for sock in (v6, v4):
            sock.listen(128)
            sock.settimeout(0.2)
            self._sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for sock in self._sockets:
            sock.close()


def connect(ns: str, address: str, port: int, timeout: float, source: str | None = None) -> str:
    """'connected', 'timeout' (dropped on the way) or the error (e.g. refused) of one TCP
    connection from namespace `ns` (from address `source` when given)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with inside(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((address, port))
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()
    return "connected"


def connect_all(
    attempts: list[tuple[str, str, str, int]], timeout: float = 1.0
) -> dict[tuple[str, str, str, int], str]:
    """Runs every (label, ns, address, port) attempt at once; their outcomes by attempt."""
    with ThreadPoolExecutor(max_workers=max(1, len(attempts))) as pool:
        futures = {a: pool.submit(connect, a[1], a[2], a[3], timeout) for a in attempts}
        return {a: future.result() for a, future in futures.items()}
