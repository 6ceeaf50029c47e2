"""A stand-in for the device daemon in the kill -9 tests: the real Outbox and Sync in a
real process, appending events continuously and syncing them.

After each commit it appends the committed event ids to ``--committed`` (written to
the OS before the next commit), so every id in that file was in the outbox when the
process died. SIGTERM stops it cleanly (exit 0).

    python tests/outbox_writer.py --db OUTBOX --port N --device ID --committed FILE [--rate N]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from edge.config import Backoff, DeviceInfo, MqttConfig, OutboxConfig
from edge.core.logs import setup_logging
from edge.sync import events as E
from edge.sync.client import Sync
from edge.sync.outbox import Outbox


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--committed", type=Path, required=True)
    p.add_argument("--rate", type=float, default=2000, help="events per second; 0 only syncs")
    p.add_argument("--ack-timeout", type=float, default=1.0)
    args = p.parse_args()

    setup_logging("json", "warning")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    cfg = OutboxConfig(path=args.db, ack_timeout_s=args.ack_timeout, batch_events=200, window=4)
    outbox = Outbox.open(cfg, args.device)
    record = open(args.committed, "a", encoding="ascii")

    def committed(events) -> None:
        record.write("".join(f"{e.id}\n" for e in events))
        record.flush()

    outbox.add_listener(committed)
    mqtt = MqttConfig(host="127.0.0.1", port=args.port, keepalive_s=5, reconnect=Backoff(initial_s=0.1, max_s=0.5))
    sync = Sync(mqtt, DeviceInfo(id=args.device), outbox, models={"detector": "test-1"})
    sync.start()
    print("started", flush=True)
    n = 0
    tick = 0.01
    while not stop.wait(tick):
        for _ in range(int(args.rate * tick)):
            n += 1
            event = (E.detection_summary("c0", time.time(), "m", [{"label": "part", "score": 0.8, "box": [1, 2, 3, 4]}], frame=n)
                     if n % 10 else E.health_snapshot("c0", {"n": n}))
            outbox.append(event)
    sync.stop()
    outbox.close()
    record.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
