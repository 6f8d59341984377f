"""Hostile DICOM peers against ``radialog node`` in its own process: does a modality still get through?

    .venv/bin/python -m bench.hostile [--scenarios bare,partial,slow,oversized,stalled,flood]
                                      [--radialog PATH] [--legit 10]

Each scenario starts a fresh node (SQLite registry, loopback, ``RADIALOG_ACSE_TIMEOUT`` and
``RADIALOG_PDU_TIMEOUT`` 10 s so a run stays short), measures its resident memory, opens the hostile
connections (bench/dicom_wire.py writes their bytes), and while they are open sends ``--legit``
instances one association each with pynetdicom, as a modality would. It prints, per scenario: the
hostile connections and what the node did with them, the legitimate stores acknowledged (Success) and
the instances in the registry afterwards, the slowest legitimate store, and the node's RSS before and
at its peak (VmHWM). ``--radialog`` runs another checkout's CLI (e.g. main before a change), for a
before/after table. Exits 1 unless every legitimate store was acknowledged and stored (.ci/run runs it).

Scenarios:

* ``bare``      300 TCP connections that send nothing and stay open (port scanners, health checks);
* ``partial``   50 connections that send 3 bytes of an A-ASSOCIATE-RQ and stall;
* ``slow``      8 associations that trickle a P-DATA-TF one byte every 0.5 s;
* ``oversized`` 20 connections declaring a 300 MB A-ASSOCIATE-RQ and 8 associations declaring a
  300 MB P-DATA-TF, each sending 16 MB of it and then stalling;
* ``stalled``   4 associations that each send 64 MB of one C-STORE data set in 1 MB PDUs and stall
  (the node runs with ``RADIALOG_MAX_INSTANCE_BYTES`` = 32 MiB here, to show the bound);
* ``flood``     ``--flood`` (320) connections one after another, each a different malformed opening.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dicom_wire import Peer, associate_rq, c_store_rq, closed_by_peer, p_data, pdu, trickle
from bench.ingest import free_port, stop_process, wait_port

MB = 1024 * 1024


@dataclass
class Node:
    pid: int
    port: int
    data_dir: Path

    def status(self, key: str) -> int:
        """A /proc/<pid>/status value (kB for VmRSS / VmHWM, a count for Threads)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def instances(self) -> int:
        with sqlite3.connect(self.data_dir / "registry.sqlite") as conn:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])


@contextmanager
def node_process(radialog: Path, work: Path, **env: Any) -> Iterator[Node]:
    import subprocess

    data_dir = work / "var"
    values = {
        "DATA_DIR": data_dir,
        "MIN_FREE_BYTES": 0,
        "STABLE_AFTER": 3600,
        "DICOM_HOST": "127.0.0.1",
        "ACSE_TIMEOUT": 10,
        "PDU_TIMEOUT": 10,
        "LOG_LEVEL": "WARNING",
        **env,
    }
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RADIALOG_")}
    environment.update({f"RADIALOG_{k}": str(v) for k, v in values.items()})
    port = free_port()
    log = open(work / "node.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(radialog), "node", "--port", str(port), "--no-enqueue"], env=environment, stdout=log, stderr=log
    )
    try:
        wait_port(port)
        yield Node(proc.pid, port, data_dir)
    finally:
        stop_process(proc)
        log.close()


@dataclass
class Legit:
    """Stores a modality makes while the attack runs: one association each, with a short timeout."""

    statuses: list[int | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def send(self, port: int, count: int) -> None:
        from pynetdicom import AE

        from radialog.synthetic import make_cxr

        for index in range(count):
            ds = make_cxr(rows=512, cols=512, seed=index)
            ae = AE(ae_title="MODALITY")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 30
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            started = time.perf_counter()
            status = None
            assoc = ae.associate("127.0.0.1", port, ae_title="RADIALOG")
            if assoc.is_established:
                response = assoc.send_c_store(ds)
                status = int(response.Status) if "Status" in response else None
                assoc.release()
            self.seconds.append(time.perf_counter() - started)
            self.statuses.append(status)


def _open(port: int, count: int, payload: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        if payload:
            sock.sendall(payload)
        socks.append(sock)
    return socks


def _closed(socks: list[socket.socket], wait: float) -> int:
    """How many of ``socks`` the node closed (or aborted) within ``wait`` seconds of now (in parallel)."""
    results: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: results.append(closed_by_peer(s, wait))) for s in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in socks:
        sock.close()
    return sum(results)


def _associated(port: int, count: int) -> list[Peer]:
    peers = []
    for _ in range(count):
        try:
            peers.append(Peer.associate(port))
        except (OSError, ConnectionError):
            break
    return peers


def bare(node: Node, legit: Legit, n_legit: int) -> str:
    socks = _open(node.port, 300, b"")
    legit.send(node.port, n_legit)
    closed = _closed(socks, wait=25)
    return f"300 silent connections: {closed} closed by the node within acse_timeout + 15 s"


def partial(node: Node, legit: Legit, n_legit: int) -> str:
    socks = _open(node.port, 50, associate_rq()[:3])
    legit.send(node.port, n_legit)
    closed = _closed(socks, wait=25)
    return f"50 partial A-ASSOCIATE-RQs (3 bytes): {closed} closed by the node within acse_timeout + 15 s"


def slow(node: Node, legit: Legit, n_legit: int) -> str:
    peers = _associated(node.port, 8)
    data = p_data(1, (0x03, b"\x00" * 110))
    sent: list[int] = []
    threads = [threading.Thread(target=lambda p=p: sent.append(trickle(p.sock, data, 0.5))) for p in peers]
    for thread in threads:
        thread.start()
    legit.send(node.port, n_legit)
    for thread in threads:
        thread.join(timeout=60)
    closed = _closed([p.sock for p in peers], wait=15)
    return (
        f"{len(peers)} associations trickling 1 byte / 0.5 s: {closed} closed, after at most "
        f"{max(sent, default=0)} of {len(data)} bytes"
    )


def oversized(node: Node, legit: Legit, n_legit: int) -> str:
    declared = 300 * MB
    unassociated = _open(node.port, 20, struct.pack(">BBL", 0x01, 0, declared))
    peers = _associated(node.port, 8)
    for peer in peers:
        peer.send(struct.pack(">BBL", 0x04, 0, declared))
    chunk = b"\x00" * MB
    for sock in unassociated + [p.sock for p in peers]:
        try:
            sock.settimeout(5)
            for _ in range(16):
                sock.sendall(chunk)
        except OSError:
            pass
    legit.send(node.port, n_legit)
    closed = _closed(unassociated + [p.sock for p in peers], wait=15)
    return f"20 + {len(peers)} connections declaring 300 MB PDUs, 16 MB sent each: {closed} aborted/closed"


def stalled(node: Node, legit: Legit, n_legit: int) -> str:
    peers = _associated(node.port, 4)
    step = MB - 16
    for peer in peers:
        peer.send(p_data(1, (0x03, c_store_rq(1, "1.2.826.0.1.3680043.9.7433.9." + str(peer.sock.fileno())))))
    for peer in peers:
        try:
            for _ in range(64):
                peer.send(p_data(1, (0x00, b"\x00" * step)))
        except OSError:
            pass
    legit.send(node.port, n_legit)
    closed = _closed([p.sock for p in peers], wait=1)
    return f"{len(peers)} C-STOREs stalled after 64 MB each (max_instance_bytes 32 MiB): {closed} closed so far"


FLOOD = [320]


def flood(node: Node, legit: Legit, n_legit: int) -> str:
    good = associate_rq()
    openings = [
        b"GET / HTTP/1.1\r\n\r\n",
        pdu(0x04, b"\x00" * 64),
        pdu(0x01, b"\x00" * 10),
        good[:6] + bytes(len(good) - 6),
        good[:40] + b"\xff" * (len(good) - 40),
        pdu(0x07, b"\x00" * 4),
        bytes(range(256)),
        struct.pack(">BBL", 0x01, 0, 1 << 31),
    ]
    threads_before = node.status("Threads")
    sender = threading.Thread(target=legit.send, args=(node.port, n_legit))
    sender.start()
    closed = 0
    for index in range(FLOOD[0]):
        with socket.create_connection(("127.0.0.1", node.port), timeout=60) as sock:
            try:
                sock.sendall(openings[index % len(openings)])
            except OSError:
                pass
            closed += closed_by_peer(sock, wait=20)
    sender.join()
    time.sleep(1)
    return (
        f"{FLOOD[0]} malformed openings in a row: {closed} closed by the node; node threads "
        f"{threads_before} before, {node.status('Threads')} after"
    )


SCENARIOS: dict[str, tuple[Callable[[Node, Legit, int], str], dict[str, Any]]] = {
    "bare": (bare, {}),
    "partial": (partial, {}),
    "slow": (slow, {}),
    "oversized": (oversized, {}),
    "stalled": (stalled, {"MAX_INSTANCE_BYTES": 32 * MB}),
    "flood": (flood, {}),
}


def run(name: str, radialog: Path, n_legit: int) -> bool:
    scenario, env = SCENARIOS[name]
    with (
        tempfile.TemporaryDirectory(prefix="radialog-hostile-") as tmp,
        node_process(radialog, Path(tmp), **env) as node,
    ):
        time.sleep(0.5)
        rss_before = node.status("VmRSS")
        legit = Legit()
        started = time.perf_counter()
        what = scenario(node, legit, n_legit)
        elapsed = time.perf_counter() - started
        ok = sum(1 for s in legit.statuses if s == 0)
        print(f"{name:9s} | {what}")
        print(
            f"{'':9s} | legitimate: {ok}/{len(legit.statuses)} Success, {node.instances()} in the registry, "
            f"slowest {max(legit.seconds, default=0):.2f} s | RSS {rss_before / 1024:.0f} MB before, peak "
            f"{node.status('VmHWM') / 1024:.0f} MB | scenario {elapsed:.0f} s",
            flush=True,
        )
        return ok == n_legit == node.instances()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--radialog",
        type=Path,
        default=Path(sys.executable).with_name("radialog"),
        help="the radialog CLI to attack (default: this checkout's)",
    )
    parser.add_argument("--legit", type=int, default=10, help="legitimate stores per scenario")
    parser.add_argument("--flood", type=int, default=320, help="malformed connections in the flood scenario")
    args = parser.parse_args(argv)
    FLOOD[0] = args.flood
    print(f"node: {args.radialog}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    served = [run(name.strip(), args.radialog, args.legit) for name in args.scenarios.split(",") if name.strip()]
    if not all(served):
        print("FAILED: legitimate stores were refused or lost during an attack")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
