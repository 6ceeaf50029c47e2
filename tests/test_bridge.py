"""A Mosquitto per site bridged to a central broker, with the bridge files in
configs/brokers: a device on the site broker, the manager on the central one, a rollout
and the outbox's ingest through the bridge, and the bridge cut for 30 s mid-sync."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from broker import REPO, Broker, FleetProcess, free_port, wait_until
from conftest import db_rows

from edge.config import Backoff, DeviceInfo, MqttConfig, OutboxConfig
from edge.core.signing import init_keys
from edge.sync import events as E
from edge.sync.client import Sync
from edge.sync.outbox import Outbox
from fleet.client import FleetClient

CONFIGS = REPO / "configs" / "brokers"
CUT_S = 30.0


class Cable:
    """A TCP forwarder on loopback standing for the network between site and centre: cut
    drops every connection through it and refuses new ones until it is mended."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.cut = threading.Event()
        self._conns: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def sever(self) -> None:
        self.cut.set()
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conns = []

    def mend(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.sever()
        self._server.close()


def site_broker(workdir: Path, central_port: int) -> Broker:
    """configs/brokers/site.conf with this machine's ports and directories."""
    site = Broker(workdir)
    ours = site.conf.read_text().replace("max_queued_messages 10000\n", "")
    bridge = (CONFIGS / "site.conf").read_text()
    bridge = bridge[bridge.index("connection central"):]
    site.conf.write_text(ours + bridge.replace("central.example.net:1883", f"127.0.0.1:{central_port}")
                         + "max_queued_messages 100000\n")
    return site


def test_a_device_on_a_site_broker_rolls_out_and_syncs_through_the_bridge_and_survives_a_cut(tmp_path):
    central = Broker(tmp_path / "central").start()
    cable = Cable(central.port)
    site = site_broker(tmp_path / "site", cable.port).start()
    keys = tmp_path / "keys"
    init_keys(keys)
    fleet = FleetProcess(tmp_path / "fleet.db", central, "--keys", str(keys), "--operator", "operator")
    outbox = Outbox.open(OutboxConfig(path=tmp_path / "outbox.db", ack_timeout_s=2, batch_events=20), "cam-1")
    sync = Sync(MqttConfig(host=site.host, port=site.port, reconnect=Backoff(initial_s=0.1, max_s=1)),
                DeviceInfo(id="cam-1", site="plant-a", line="3"), outbox, models={})
    sim = None
    try:
        fleet.wait_for("control subscribed")
        from test_fleet_rollout import A, B, push_model, rollout_args, simulate

        with FleetClient(central.host, central.port, identity="operator", timeout=30) as client:
            b = push_model(client, B)
            push_model(client, A)
            sim = simulate(site, keys, 3)  # the devices know only their site's broker
            wait_until(lambda: db_rows(str(tmp_path / "fleet.db"),
                                       "SELECT count(*) FROM devices WHERE state = 'online'") == [(3,)],
                       30, "the devices' statuses through the bridge")
            rid = client.call("rollouts.start", rollout_args(target={"ids": sorted(sim.devices)}, canary=1,
                                                             waves=[100], health_window_s=0.5))["id"]
            done = wait_until(lambda: (s := client.call("rollouts.status", {"id": rid}))["state"] == "completed"
                              and s, 90, "the rollout through the bridge")
        assert done["counts"] == {"succeeded": 3} and all(sim.running(d) == b["sha256"] for d in sim.devices)

        sync.start()
        ids = []
        for i in range(300):
            event = E.health_snapshot("c0", {"i": i})
            outbox.append(event)
            ids.append(event.id)
            if i == 100:
                cable.sever()  # mid-sync: batches in flight are lost with the link, or wait in the site's queue
                cut_at = time.monotonic()
            time.sleep(0.01)
        wait_until(lambda: time.monotonic() - cut_at >= CUT_S, CUT_S + 5, "the cut's end", interval=0.5)
        assert outbox.stats()["rows"] > 0, "the device kept what the fleet had not acked"
        cable.mend()
        wait_until(lambda: outbox.flush() and outbox.stats()["rows"] == 0, 60, "every event acked after the cut")
        stored = [i for (i,) in db_rows(str(tmp_path / "fleet.db"), "SELECT id FROM events")]
        assert sorted(stored) == sorted(ids), "every event once"
    finally:
        if sim:
            sim.stop()
        sync.stop()
        outbox.close()
        fleet.stop()
        site.stop()
        cable.close()
        central.stop()
