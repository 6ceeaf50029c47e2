"""The fleet's Mosquitto configuration, generated from the registry and kept in step with it.

``fleet broker config --out DIR`` writes a Mosquitto 2 configuration: a TLS listener
for certificates (the certificate's name is the user and the client id), a TLS
listener for passwords when an identity has one, and only if asked a plaintext one on
the loopback; no anonymous access; the password file; the revocation list; and the
dynamic security plugin's file with one role per device (and one each for the
managers, every operator, every controller and the administrator) and one client per
connection, bound to its own client id.

Why the dynamic security plugin and not an ACL file: Mosquitto 2.0's ACL file checks
no subscription at all (``FIXME - implement ACL subscription strings`` in its source;
every SUBSCRIBE is granted), so a device that subscribes to the fleet's shared ingest
group is granted it, the broker hands it its share of every device's batches and then
drops them at the read check, and those devices wait for acks that never come. The
plugin checks subscriptions against its own rules and refuses that one (SUBACK "not
authorized"); it also refuses a password client that connects with another client id.
The plugin reads its file only at start, so on every enrolment or revocation the
fleet applies the difference live through the plugin's control topic
(``$CONTROL/dynamic-security/v1``, as the ``fleet-admin`` identity) and then sends
SIGHUP, on which Mosquitto rereads the password file and the revocation list.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, ConfigDict, Field

from edge.core.contract import DEFAULT_PREFIX, SHARE_GROUP, Topics, ha_object_id
from edge.core.contract import HA_DISCOVERY_PREFIX as HA_PREFIX
from edge.core.contract import SPARKPLUG_NAMESPACE as SPARKPLUG
from edge.core.errors import EdgeError, UsageError
from edge.core.files import replace_file
from edge.core.tls import client_context

from .ca import CA_CERT, CRL, FleetCA, cert_pem, key_pem, new_key, write_private
from .identities import ADMIN, connections, enrol, revoke
from .store import IdentityRow, Store

CONTROL = "$CONTROL/dynamic-security/v1"
SETTINGS = "broker.json"
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib/arm-linux-gnueabihf",
               "/usr/lib", "/usr/local/lib", "/usr/lib/mosquitto", "/usr/local/lib/mosquitto")
PLUGIN = "mosquitto_dynamic_security.so"
DEFAULT_ACCESS = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False, "unsubscribe": True}


class BrokerSettings(BaseModel):
    """How ``fleet broker config`` was asked to write the broker's configuration (kept in
    the CA's directory, so every later enrolment regenerates the same one)."""

    model_config = ConfigDict(extra="forbid")
    out: Path
    hosts: list[str] = Field(default_factory=lambda: ["localhost"], min_length=1)
    port: int = Field(default=8883, gt=0, lt=65536)
    password_port: int | None = Field(default=8884, gt=0, lt=65536)
    plaintext_port: int | None = Field(default=None, gt=0, lt=65536)  # loopback only
    prefix: str = DEFAULT_PREFIX
    plugin: str | None = None

    @classmethod
    def load(cls, pki: Path) -> "BrokerSettings | None":
        path = pki / SETTINGS
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise EdgeError(f"{path} does not load: {exc}") from None

    def save(self, pki: Path) -> None:
        replace_file(pki / SETTINGS, self.model_dump_json(indent=2).encode())

    def address(self) -> tuple[str, int]:
        """Where the fleet's own tools reach the broker (the certificate listener)."""
        return self.hosts[0], self.port


# --- the rights of each role -----------------------------------------------------------------


def role_name(identity: IdentityRow) -> str:
    return "manager" if identity.role == "manager" else f"{identity.role}/{identity.name}"


def rights(identity: IdentityRow, topics: Topics) -> list[dict[str, Any]]:
    """The plugin's ACL entries for ``identity``'s role: exactly what it may write,
    subscribe to and receive; the plugin's default denies everything else."""
    p = topics.prefix
    send: list[str] = []
    subscribe: list[str] = []  # patterns: a subscription must fall within one
    literal: list[str] = []  # exact subscriptions (a shared one cannot be a pattern)
    receive: list[str] = []
    if identity.role == "device":
        d = f"{p}/dev/{identity.name}"
        command = topics.command(identity.site or "", identity.line or "", identity.name)
        send = [f"{d}/status", f"{d}/outbox", f"{d}/reported", f"{d}/job/+", f"{d}/artifact/get",
                f"{d}/review/reply/+/+",  # Topics.review_reply: to any operator that asks it
                f"{p}/alerts/{identity.site}/{identity.line}/#", f"{command}/result",
                *_sparkplug_node(identity), f"{HA_PREFIX}/device/{ha_object_id(identity.name)}/config"]
        # the managers' "ingest online" announcement and Home Assistant's status: everyone's, so not its own topics
        subscribe = receive = [f"{d}/desired", f"{d}/ack", f"{d}/artifact/+", topics.review_gets(identity.name),
                               topics.ingest_online(), command,
                               f"{SPARKPLUG}/{identity.site}/NCMD/{identity.name}",
                               f"{SPARKPLUG}/{identity.site}/DCMD/{identity.name}/+", f"{HA_PREFIX}/status"]
    elif identity.role == "manager":
        reads = [topics.all_status(), topics.all_reported(), topics.all_jobs(), topics.all_artifact_gets(),
                 topics.all_rpc()]
        literal = [topics.shared_outbox(SHARE_GROUP), *reads]
        receive = [f"{p}/dev/+/outbox", *reads]
        send = [f"{p}/dev/+/ack", f"{p}/dev/+/desired", f"{p}/dev/+/artifact/+", f"{p}/fleet/reply/#",
                topics.ingest_online()]
    elif identity.role == "operator":
        # snapshot fetches go to the devices directly, under the operator's own name, and
        # come back on topics only it reads: the managers can neither ask nor read them
        send = [topics.rpc(identity.name), f"{p}/dev/+/review/get/{identity.name}"]  # Topics.review_get
        subscribe = receive = [f"{p}/fleet/reply/{identity.name}/#", topics.review_replies(identity.name)]
    elif identity.role == "controller":
        line = identity.line or "+"  # a controller without a line is the site's
        where = f"{identity.site}" + (f"/{identity.line}" if identity.line else "")
        send = [f"{p}/commands/{identity.site}/{line}/+", f"{HA_PREFIX}/status"]
        subscribe = receive = [f"{p}/alerts/{where}/#", f"{p}/commands/{identity.site}/{line}/+/result",
                               f"{HA_PREFIX}/device/+/config"]
        if not identity.line:  # Sparkplug has no line level: only the site's controllers are its host
            send += [f"{SPARKPLUG}/{identity.site}/NCMD/+", f"{SPARKPLUG}/{identity.site}/DCMD/+/+",
                     f"{SPARKPLUG}/STATE/{identity.name}"]
            subscribe = receive = [*receive, f"{SPARKPLUG}/{identity.site}/#"]
    elif identity.role == "admin":
        send = [CONTROL]
        literal = [f"{CONTROL}/response"]
        subscribe = ["$SYS/#"]
        receive = [f"{CONTROL}/response", "$SYS/#"]
    acls = [("publishClientSend", send), ("subscribePattern", subscribe), ("subscribeLiteral", literal),
            ("publishClientReceive", receive)]
    return [{"acltype": kind, "topic": topic, "priority": 0, "allow": True}
            for kind, topics_ in acls for topic in topics_]


def _sparkplug_node(identity: IdentityRow) -> list[str]:
    """What a device may publish as a Sparkplug edge node: its group is its site, its
    edge node id its device id, so no device speaks for another one."""
    node = f"{SPARKPLUG}/{identity.site}/{{verb}}/{identity.name}"
    return [*(node.format(verb=v) for v in ("NBIRTH", "NDATA", "NDEATH")),
            *(node.format(verb=v) + "/+" for v in ("DBIRTH", "DDATA", "DDEATH"))]


@dataclass
class Plan:
    """What the broker should hold: roles by name, clients by user name."""

    roles: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)  # user → hash (password identities)

    @classmethod
    def of(cls, identities: list[IdentityRow], topics: Topics) -> "Plan":
        plan = cls()
        for identity in identities:
            if identity.state != "enrolled":
                continue
            role = role_name(identity)
            plan.roles[role] = rights(identity, topics)
            for conn in connections(identity):
                plan.clients[conn] = {"username": conn, "clientid": conn, "roles": [{"rolename": role}]}
                if identity.password_hash:
                    plan.passwords[conn] = identity.password_hash
        return plan

    def dynsec(self) -> dict[str, Any]:
        """The plugin's file."""
        return {"defaultACLAccess": DEFAULT_ACCESS,
                "roles": [{"rolename": name, "acls": acls} for name, acls in sorted(self.roles.items())],
                "clients": [client for _, client in sorted(self.clients.items())], "groups": []}

    def password_file(self) -> str:
        return "".join(f"{user}:{pw_hash}\n" for user, pw_hash in sorted(self.passwords.items()))

    def commands(self, roles: dict[str, list[dict[str, Any]]], clients: dict[str, dict[str, Any]]) -> list[dict]:
        """The plugin's commands that turn what the broker holds (``roles``, ``clients``) into this plan."""
        out: list[dict[str, Any]] = [{"command": "setDefaultACLAccess",
                                      "acls": [{"acltype": k, "allow": v} for k, v in DEFAULT_ACCESS.items()]}]
        for name, acls in self.roles.items():
            if name not in roles:
                out.append({"command": "createRole", "rolename": name, "acls": acls})
            elif _acl_set(roles[name]) != _acl_set(acls):
                out.append({"command": "modifyRole", "rolename": name, "acls": acls})
        for user in clients.keys() - self.clients.keys():
            out.append({"command": "deleteClient", "username": user})  # kicks it, if connected
        for user, client in self.clients.items():
            held = clients.get(user)
            if held is None:
                out.append({"command": "createClient", **client})
            elif held.get("clientid") != client["clientid"] or _role_names(held) != _role_names(client):
                out.append({"command": "modifyClient", **client})
        for name in roles.keys() - self.roles.keys():
            out.append({"command": "deleteRole", "rolename": name})
        return out


def _acl_set(acls: list[dict[str, Any]]) -> set[tuple]:
    return {(a["acltype"].lower(), a["topic"], a.get("priority", 0), a.get("allow", False)) for a in acls}


def _role_names(client: dict[str, Any]) -> set[str]:
    return {r["rolename"] for r in client.get("roles", [])}


# --- writing the configuration -------------------------------------------------------------------


def find_plugin(explicit: str | None) -> str:
    if explicit:
        if not Path(explicit).is_file():
            raise UsageError(f"no Mosquitto plugin at {explicit}")
        return explicit
    for directory in PLUGIN_DIRS:
        if (Path(directory) / PLUGIN).is_file():
            return str(Path(directory) / PLUGIN)
    raise UsageError(f"cannot find {PLUGIN} (Mosquitto 2.0 or later ships it); name it with --plugin")


def ensure_admin(store: Store, ca: FleetCA, pki: Path, now: float) -> None:
    """The ``fleet-admin`` identity and its certificate in the CA's directory."""
    admin = store.identity(ADMIN)
    if admin is not None and admin.state == "enrolled":
        if (pki / f"{ADMIN}.crt").exists():
            return
        revoke(store, ADMIN, now=now)  # its certificate is lost: a new one
    issued = enrol(store, ca, ADMIN, "admin", now=now)
    write_private(pki / f"{ADMIN}.key", key_pem(issued.key))
    replace_file(pki / f"{ADMIN}.crt", cert_pem(issued.certs[ADMIN]))
    store.put_identities([issued.identity])


def ensure_server_cert(ca: FleetCA, pki: Path, hosts: list[str]) -> None:
    """The broker's certificate for ``hosts`` (and the loopback), made again if they changed."""
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    cert_path = pki / "server.crt"
    if cert_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(n.value) for n in san}
        if have == set(names) and cert.not_valid_after_utc.timestamp() > time.time() + 30 * 86400:
            return
    key = new_key()
    write_private(pki / "server.key", key_pem(key))
    replace_file(cert_path, cert_pem(ca.issue(names[0], key, server_names=names)))


def write_config(settings: BrokerSettings, store: Store, pki: Path) -> Plan:
    """Every file the broker needs, in ``settings.out``; returns the plan it holds.

    Run as root on a directory the broker's user owns (``chown -R mosquitto: DIR``),
    the files take the directory's owner, so the broker still reads them after a reload.
    """
    out = settings.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    plan = Plan.of(store.identities(), Topics(settings.prefix))
    files = {CA_CERT: (pki / CA_CERT).read_bytes(), CRL: (pki / CRL).read_bytes(),
             "server.crt": (pki / "server.crt").read_bytes(), "server.key": (pki / "server.key").read_bytes(),
             "passwd": plan.password_file().encode(),
             "dynamic-security.json": json.dumps(plan.dynsec(), indent=1).encode(),
             "mosquitto.conf": mosquitto_conf(settings, out, bool(plan.passwords)).encode()}
    owner = os.stat(out)
    for name, data in files.items():
        replace_file(out / name, data, mode=0o600)
        if os.geteuid() == 0 and owner.st_uid != 0:
            os.chown(out / name, owner.st_uid, owner.st_gid)
    return plan


def mosquitto_conf(s: BrokerSettings, out: Path, passwords: bool) -> str:
    tls = f"cafile {out / CA_CERT}\ncertfile {out / 'server.crt'}\nkeyfile {out / 'server.key'}\n"
    lines = [
        "# Written by `fleet broker config` from the fleet's registry: regenerated on every",
        "# `fleet devices add|revoke` and `fleet identities add|revoke`; do not edit.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"plugin {find_plugin(s.plugin)}",
        f"plugin_opt_config_file {out / 'dynamic-security.json'}",
        f"password_file {out / 'passwd'}",
        f"pid_file {out / 'mosquitto.pid'}",
        "persistence true",
        f"persistence_location {out}/",
        "max_queued_messages 10000",
        "set_tcp_nodelay true",
        "",
        "# Certificates: the certificate's name is the user and the client id.",
        f"listener {s.port}",
        tls + f"crlfile {out / CRL}\nrequire_certificate true\nuse_identity_as_username true\n"
              "use_username_as_clientid true",
    ]
    if s.password_port and passwords:
        lines += ["", "# Passwords, over TLS; the plugin binds each user to its client id.",
                  f"listener {s.password_port}", tls.rstrip("\n")]
    if s.plaintext_port:
        lines += ["", "# Plaintext, on the loopback only (passwords).", f"listener {s.plaintext_port} 127.0.0.1"]
    return "\n".join(lines) + "\n"


# --- keeping a running broker in step ------------------------------------------------------------


def reload(out: Path) -> str:
    """SIGHUP the broker whose pid file is in ``out``: it rereads the password file and
    the revocation list. Returns what happened, for the operator."""
    try:
        pid = int((out / "mosquitto.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return "no running broker found (its pid file is absent): the changes take effect when it starts"
    if comm != "mosquitto":
        return f"pid {pid} from {out / 'mosquitto.pid'} is not mosquitto: reload it yourself (systemctl reload mosquitto)"
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return f"cannot signal mosquitto (pid {pid}): {exc.strerror}; reload it yourself (systemctl reload mosquitto)"
    return f"mosquitto (pid {pid}) told to reload"


class Control:
    """The plugin's control topic, as the ``fleet-admin`` identity; use as a context manager."""

    def __init__(self, host: str, port: int, pki: Path, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._responses: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=ADMIN, protocol=mqtt.MQTTv5)
        self._client.tls_set_context(client_context(str(pki / CA_CERT), str(pki / f"{ADMIN}.crt"),
                                                    str(pki / f"{ADMIN}.key")))
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._host, self._port = host, port

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._subscribed.set()

    def __enter__(self) -> "Control":
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise EdgeError(f"cannot reach the broker at {self._host}:{self._port}: {exc}") from None
        self._client.loop_start()
        self._client.subscribe(f"{CONTROL}/response", qos=1)
        if not self._subscribed.wait(self.timeout) or self._refused:
            self.close()
            raise EdgeError(f"the broker at {self._host}:{self._port} did not accept {ADMIN}"
                            + (f": {self._refused}" if self._refused else ""))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._responses.extend(json.loads(message.payload).get("responses", []))
            self._cond.notify_all()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``commands``; their responses, in order. EdgeError on any error."""
        tag = secrets.token_hex(4)
        tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        self._client.publish(CONTROL, json.dumps({"commands": tagged}), qos=1)
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                mine = [r for r in self._responses if str(r.get("correlationData", "")).startswith(tag)]
                if len(mine) >= len(commands):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EdgeError(f"the broker answered {len(mine)} of {len(commands)} commands")
                self._cond.wait(left)
        errors = [f"{r['command']}: {r['error']}" for r in mine if r.get("error")]
        if errors:
            raise EdgeError("the broker refused: " + "; ".join(errors[:5]))
        return mine

    def held(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
        """The roles and clients the plugin holds now."""
        clients, roles = self.run([{"command": "listClients", "verbose": True, "count": -1, "offset": 0},
                                   {"command": "listRoles", "verbose": True, "count": -1, "offset": 0}])
        return ({r["rolename"]: r.get("acls", []) for r in roles["data"]["roles"]},
                {c["username"]: c for c in clients["data"]["clients"]})


def apply(plan: Plan, settings: BrokerSettings, pki: Path, *, revoking: bool,
          broker: tuple[str, int] | None = None) -> list[str]:
    """Bring a running broker in step with ``plan``; returns what happened, line by line.

    A revocation is reloaded first (so a revoked client that reconnects at once meets the
    new password file and revocation list), then the plugin's client is deleted, which
    disconnects it; an enrolment is the other way round.
    """
    notes: list[str] = []
    if revoking:
        notes.append(reload(settings.out.resolve()))
    host, port = broker or settings.address()
    try:
        with Control(host, port, pki) as control:
            roles, clients = control.held()
            commands = plan.commands(roles, clients)
            control.run(commands)
        changed = [c for c in commands if c["command"] != "setDefaultACLAccess"]
        notes.append(f"broker at {host}:{port}: {len(changed)} change(s) applied"
                     + (f" ({', '.join(sorted({c['command'] for c in changed}))})" if changed else ""))
    except EdgeError as exc:
        notes.append(f"broker at {host}:{port} not updated ({exc}): the configuration in {settings.out} takes "
                     "effect when it (re)starts")
    if not revoking:
        notes.append(reload(settings.out.resolve()))
    return notes
