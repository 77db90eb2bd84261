#!/usr/bin/python3
"""Relay for qemu's guestfwd=...-cmd: the guest's TCP connection arrives on stdin/stdout (a
loopback TCP socket made by libslirp); this copies bytes both ways to 127.0.0.1:PORT and to
nothing else.

libslirp's end of that socket pair has Nagle on, so every write >= 4 KiB would wait ~40 ms for our
delayed ACK; TCP_QUICKACK after each read makes us ACK at once. The upstream socket is plain
(TCP_NODELAY like nbd-client, default delayed ACKs), so a server that forgets TCP_NODELAY still
shows the stall a real client would see.
"""
import os
import select
import socket
import sys

CHUNK = 256 * 1024


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or not 0 < int(sys.argv[1]) < 65536:
        sys.stderr.write("usage: relay.py PORT (connects to 127.0.0.1:PORT only)\n")
        return 2
    guest = socket.socket(fileno=os.dup(0))
    upstream = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    parent = os.getppid()
    peer = {guest: upstream, upstream: guest}
    open_reads = {guest, upstream}
    while open_reads:
        ready, _, _ = select.select(list(open_reads), [], [], 1.0)
        if os.getppid() != parent:
            return 0  # qemu is gone
        for src in ready:
            try:
                data = src.recv(CHUNK)
            except ConnectionError:
                data = b""
            if src is guest:
                guest.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            if not data:
                open_reads.discard(src)
                try:
                    peer[src].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if src is upstream:
                    return 0  # the server closed: nothing more can reach the guest
                continue
            try:
                peer[src].sendall(data)
            except OSError:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
