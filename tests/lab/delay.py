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
import select
import signal
import struct
import sys
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
    os.set_blocking(fd, False)
    # One thread, one poll: the timeout is the time until the next packet is due, so
    # there are no cross-thread wake-ups (an earlier two-thread version added tens of ms
    # under CPU contention).
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    last_due = 0.0
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("ready", flush=True)
    while not stopping:
        now = time.monotonic()
        timeout_ms = 500 if not queue else max(0.0, (queue[0][0] - now) * 1000)
        try:
            events = poller.poll(timeout_ms)
        except InterruptedError:
            continue
        if events:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    stopping = True
                    break
                arrival = time.monotonic()
                hold = delay + (rng.uniform(-jitter, jitter) if jitter else 0.0)
                last_due = max(arrival + max(hold, 0.0), last_due)  # FIFO: never reorder
                queue.append((last_due, packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, packet = queue.popleft()
            with contextlib.suppress(OSError):  # e.g. no route: dropped, as a router would
                os.write(fd, packet)
    sys.exit(0)


if __name__ == "__main__":
    main()
