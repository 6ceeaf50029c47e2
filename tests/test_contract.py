"""The contract's one strict decoder: what every topic refuses, and why, and what it must never refuse."""

from __future__ import annotations

import json
import time

import pytest

from edge.core import contract as C
from edge.core.ids import new_id
from edge.sync import events as E

SHA = "ab" * 32
T = C.Topics()


def batch(device: str = "cam-1", **event: object) -> bytes:
    e = E.health_snapshot("c0", {"fps": 9.5, "n": [1, 2, 3]})
    fields = dict(id=e.id, seq=1, kind=e.kind.value, device=device, camera=e.camera, captured_at=e.captured_at,
                  recorded_at=e.recorded_at, priority=e.priority, payload_json=e.payload_json)
    fields.update(event)
    return C.batch_body(device, new_id(), time.time(), C.event_json(**fields))  # type: ignore[arg-type]


def good_bodies() -> dict[str, tuple[bytes, object]]:
    """One good body per decoder, as the side that sends it builds it, and how to decode it."""
    art = C.Artifact(kind="model", name="m", version="1", sha256=SHA, size=10, manifest={"input": {"mean": [0.5]}})
    return {
        "batch": (batch(), lambda b: C.decode_batch(b, device="cam-1")),
        "ack": (C.encode(C.Ack(v=1, device="cam-1", batches=[new_id()])), lambda b: C.decode_ack(b, device="cam-1")),
        "status": (C.encode(C.Status(v=1, device="cam-1", state="online", at=time.time(), models={"d": "1"})),
                   lambda b: C.decode_status(b, device="cam-1")),
        "desired": (C.encode(C.Desired(v=1, device="cam-1", version=int(time.time() * 1000), at=time.time(),
                                       models={"det": C.Assignment(artifact=art, job="r0001")})),
                    lambda b: C.decode_desired(b, device="cam-1")),
        "reported": (C.encode(C.Reported(v=1, device="cam-1", at=time.time(), desired_version=3)),
                     lambda b: C.decode_reported(b, device="cam-1")),
        "job": (C.encode(C.JobStatus(v=1, device="cam-1", job="r0001", slot="det", sha256=SHA, state="downloading",
                                     at=time.time(), progress=0.5, metrics={"swap_ms": 1.5})),
                lambda b: C.decode_job(b, device="cam-1", job="r0001")),
        "artifact_request": (C.encode(C.ArtifactRequest(v=1, device="cam-1", sha256=SHA, offset=0, length=1024,
                                                        request="q1", response_topic=T.artifact("cam-1", SHA))),
                             lambda b: C.decode_artifact_request(b, T, device="cam-1")),
        "chunk": (C.encode_chunk(C.ChunkHeader(v=1, sha256=SHA, offset=0, total=3, request="q1"), b"abc"),
                  C.decode_chunk),
        "rpc_request": (C.encode(C.RpcRequest(v=1, id="x1", op="ping", args={"n": 1.5})), C.decode_rpc_request),
        "rpc_response": (C.encode(C.RpcResponse(v=1, id="x1", ok=True, result={"at": 1.5})), C.decode_rpc_response),
        "alert": (C.encode(C.Alert(v=1, id=new_id(), device="cam-1", camera="c0", rule="r", event="entered",
                                   confidence=0.9, box=(0.1, 0.2, 0.3, 0.4), count=2, counts={"person": 2},
                                   captured_at=time.time(), published_at=time.time(), policy_version="p1")),
                  C.decode_alert),
        "alert_state": (C.encode(C.AlertState(v=1, device="cam-1", camera="c0", rule="r", on=True, since=time.time(),
                                              policy_version="p1")), C.decode_alert_state),
    }


def decode_error(decode, body: bytes) -> str:
    with pytest.raises(C.ContractError) as err:
        decode(body)
    return err.value.reason


@pytest.mark.parametrize("name", list(good_bodies()))
def test_every_decoder_refuses_non_finite_numbers_and_versions_that_are_not_the_integer_1(name):
    body, decode = good_bodies()[name]
    decode(body)  # what the sending side builds is accepted
    head, sep, data = body.partition(b"\n") if name == "chunk" else (body, b"", b"")
    doc = json.loads(head)
    number = next((k for k, v in doc.items() if type(v) in (int, float) and k != "v"), "v")
    for bad in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1E+400", b"1" * 400 + b".5"):
        text = json.dumps(doc).replace(f'"{number}": {json.dumps(doc[number])}', f'"{number}": {bad.decode()}', 1)
        assert decode_error(decode, text.encode() + sep + data) == "non_finite", (name, bad)
    for bad in ("true", "1.0", '"1"', "2"):
        text = json.dumps({**doc, "v": "@"}).replace('"@"', bad)
        assert decode_error(decode, text.encode() + sep + data) == "bad_version", (name, bad)


def test_a_number_out_of_range_anywhere_is_non_finite_and_a_merely_large_one_is_not():
    rpc = b'{"v":1,"id":"x1","op":"ping","args":{"deep":[{"x":[0,%s]}]}}'
    for bad in (b"1e999", b"1E999", b"1e+0400", b"-2.5E+309", b"9" * 309, b"1" * 250 + b"e99", b"1.0e400"):
        assert decode_error(C.decode_rpc_request, rpc % bad) == "non_finite", bad
    assert decode_error(C.decode_rpc_request, rpc % (b"9" * 5000)) == "non_finite"
    for fine in (b"1e308", b"1e-999", b"9" * 300, b"1e100", b"-0.0"):
        C.decode_rpc_request(rpc % fine)
    # an id that looks like an exponent is text, not a number
    assert C.decode_batch(batch(), device="cam-1").events[0].payload == {"fps": 9.5, "n": [1, 2, 3]}
    C.decode_rpc_request(b'{"v":1,"id":"x1","op":"ping","args":{"s":"1e999","id":"01J5E123E456E789"}}')


def test_times_sizes_and_counts_are_range_checked_but_old_times_are_kept():
    status = lambda at: b'{"v":1,"device":"cam-1","state":"online","at":%s}' % at  # noqa: E731
    for at in (b"0", b"0.0", b"86400.5", b"%r" % C.MAX_TIME):
        C.decode_status(status(at), device="cam-1")  # a box without a real-time clock boots in 1970
    for at in (b"-1", b"1e300", b'"1"', b"true"):
        assert decode_error(lambda b: C.decode_status(b, device="cam-1"), status(at)) == "schema", at
    request = C.ArtifactRequest(v=1, device="cam-1", sha256=SHA, offset=0, length=1024, request="q1",
                                response_topic=T.artifact("cam-1", SHA)).model_dump()
    for bad in ({"offset": -1}, {"offset": C.MAX_ARTIFACT_BYTES + 1}, {"length": 0}, {"length": C.MAX_CHUNK_BYTES + 1},
                {"offset": 1.0}):
        body = json.dumps({**request, **bad}).encode()
        assert decode_error(lambda b: C.decode_artifact_request(b, T, device="cam-1"), body) == "schema", bad
    header = b'{"v":1,"sha256":"%s","offset":%s,"total":%s,"request":"q1"}\n'
    for offset, total in ((b"-1", b"3"), (b"0", b"-3"), (b"0", b"%d" % (C.MAX_ARTIFACT_BYTES + 1))):
        assert decode_error(C.decode_chunk, header % (SHA.encode(), offset, total)) == "schema"
    for bad in ({"seq": -1}, {"seq": 2**63}, {"priority": 10}, {"recorded_at": C.MAX_TIME + 1}):
        assert decode_error(lambda b: C.decode_batch(b, device="cam-1"), batch(**bad)) == "schema", bad
    alert = json.loads(good_bodies()["alert"][0])
    for bad in ({"count": -1}, {"counts": {"person": -2}}, {"track": 2**64}, {"box": [0.1, 0.2, 0.3]},
                {"captured_at": -5.0}):
        assert decode_error(C.decode_alert, json.dumps({**alert, **bad}).encode()) == "schema", bad


def test_what_a_device_builds_always_decodes_at_the_fleet():
    with pytest.raises(E.PayloadError, match="float's range"):
        E.check_payload({"n": 10**400})  # Python writes it; the fleet would refuse the whole batch
    E.check_payload({"n": 10**300, "s": "9" * 400})
    for bad in (float("nan"), -1.0, C.MAX_TIME * 2):
        with pytest.raises(E.PayloadError):
            E.new_event(E.Kind.HEALTH, {}, captured_at=bad)
    old = E.new_event(E.Kind.HEALTH, {}, captured_at=0.0)  # a clock that starts in 1970
    summary = E.detection_summary("c0", time.time(), "m", [
        {"label": "person", "score": float("nan"), "box": [1, 2, 3, 4]},
        {"label": "person", "score": 0.9, "box": [1, float("inf"), 3, 4]},
        {"label": "person", "score": 0.8, "box": [1, 2, 3, 4]}])
    assert summary.payload["count"] == 1, "a broken model's NaN detection is left out, not sent"
    for e in (old, summary):
        C.decode_batch(batch(captured_at=e.captured_at, payload_json=e.payload_json), device="cam-1")
    with pytest.raises(ValueError):  # a body with NaN cannot even be built
        C.JobStatus(v=1, device="cam-1", job="j", slot="s", sha256=SHA, state="active", at=1.0,
                    metrics={"x": float("nan")})


def test_every_body_with_a_version_takes_only_the_integer_1():
    bodies = [cls for cls in vars(C).values()
              if isinstance(cls, type) and issubclass(cls, C.BaseModel) and "v" in getattr(cls, "model_fields", {})]
    assert len(bodies) >= 12
    for cls in bodies:
        for bad in (True, 1.0, "1", 2):
            with pytest.raises(C.ValidationError) as err:
                cls.model_validate({"v": bad})
            assert any(e["loc"] == ("v",) for e in err.value.errors()), (cls.__name__, bad)


def test_edge_bench_decode_reports_the_strict_decoder_against_plain_pydantic(capsys):
    from edge.cli import main

    assert main(["bench", "decode", "--events", "20", "--rounds", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["events"] == 20 and report["strict_vs_plain"] > 0 and report["strict_walked_vs_plain"] > 0
    assert main(["bench", "decode", "--events", "5000"]) == 2


def test_an_ack_with_nothing_refused_is_the_shape_every_device_reads():
    # devices older than refusals forbid unknown keys: an ordinary ack must not carry one
    batch_id = new_id()
    plain = json.loads(C.encode(C.Ack(v=1, device="cam-1", batches=[batch_id])))
    assert plain == {"v": 1, "device": "cam-1", "batches": [batch_id]}
    refusal = C.encode(C.Ack(v=1, device="cam-1", refused=[C.Refusal(batch=batch_id, reason="bad_json")]))
    assert C.decode_ack(refusal, device="cam-1").refused[0].batch == batch_id
