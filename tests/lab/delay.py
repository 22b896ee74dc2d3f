"""Userspace delay and jitter emulator for the network lab (netem is not available).

Runs inside the lab's router namespace, attached to a TUN device that policy routing
sends every forwarded packet through. Each packet is held for ``delay ± jitter`` (uniform)
and written back, in arrival order: a packet never overtakes the one before it (delivery
time = max(arrival + delay + jitter, previous delivery)), so TCP sees delay variation
without reordering, like netem with a rate or pfifo child.

    python -m tests.lab.delay --dev tun0 --delay-ms 20 --jitter-ms 2 --seed 1

Prints "ready" once attached; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import random
import signal
import struct
import sys
import threading
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def attach(dev: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev", required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    jitter = args.jitter_ms / 1000
    rng = random.Random(args.seed)
    fd = attach(args.dev)
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()
    stop = threading.Event()

    def reader() -> None:
        last = 0.0
        while not stop.is_set():
            try:
                packet = os.read(fd, 65536)
            except OSError:
                return
            now = time.monotonic()
            hold = delay + (rng.uniform(-jitter, jitter) if jitter else 0.0)
            due = max(now + max(hold, 0.0), last)
            last = due
            with ready:
                queue.append((due, packet))
                ready.notify()

    def writer() -> None:
        while not stop.is_set():
            with ready:
                while not queue and not stop.is_set():
                    ready.wait(0.1)
                if stop.is_set():
                    return
                due, packet = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    ready.wait(min(wait, 0.1))
                    continue
                queue.popleft()
            with contextlib.suppress(OSError):  # e.g. no route: dropped, as a router would
                os.write(fd, packet)

    def on_term(signum: int, frame: object) -> None:
        stop.set()
        with ready:
            ready.notify_all()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    threading.Thread(target=reader, daemon=True).start()
    worker = threading.Thread(target=writer, daemon=True)
    worker.start()
    print("ready", flush=True)
    while not stop.is_set():
        stop.wait(0.5)
    worker.join(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
