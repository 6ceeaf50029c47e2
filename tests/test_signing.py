"""Artifact signatures and the rollout half of the MQTT contract."""

from __future__ import annotations

import os
import stat

import pytest

from edge.core import contract as C
from edge.core import signing as S

SHA = "ab" * 32


def artifact(**over) -> C.Artifact:
    doc = dict(kind="model", name="yolov8n", version="8.1.42-b", sha256=SHA, size=3_300_000,
               manifest={"task": "yolov8", "labels": ["person", "bicycle"], "thresholds": {"score": 0.25}})
    return C.Artifact(**{**doc, **over})


@pytest.fixture
def keys(tmp_path):
    private, public = S.init_keys(tmp_path / "keys")
    return S.load_private_key(private), S.load_public_key(public)


def test_init_keys_makes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = S.init_keys(tmp_path)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    with pytest.raises(S.KeyFileError, match="refusing to overwrite"):
        S.init_keys(tmp_path)
    assert private.read_bytes() == before


def test_a_private_key_readable_by_others_is_refused(tmp_path):
    private, _ = S.init_keys(tmp_path)
    os.chmod(private, 0o644)
    with pytest.raises(S.KeyFileError, match="chmod 600"):
        S.load_private_key(private)


def test_a_signed_artifact_verifies_and_any_change_breaks_it(keys):
    key, pub = keys
    signed = S.sign(key, artifact())
    S.verify(pub, signed)
    for change in ({"version": "8.1.42-c"}, {"sha256": "cd" * 32}, {"size": 1},
                   {"manifest": {**signed.manifest, "thresholds": {"score": 0.05}}}):
        with pytest.raises(S.SignatureError) as err:
            S.verify(pub, signed.model_copy(update=change))
        assert err.value.reason == "bad_signature"


def test_unsigned_and_foreign_signatures_are_refused(keys, tmp_path):
    _, pub = keys
    with pytest.raises(S.SignatureError) as err:
        S.verify(pub, artifact())
    assert err.value.reason == "unsigned"
    private, _ = S.init_keys(tmp_path / "other")
    foreign = S.sign(S.load_private_key(private), artifact())
    with pytest.raises(S.SignatureError) as err:
        S.verify(pub, foreign)
    assert err.value.reason == "bad_signature"


def test_a_desired_state_is_signed_with_its_version_and_device_and_verifies_with_any_pinned_key(keys, tmp_path):
    key, pub = keys
    private, public = S.init_keys(tmp_path / "next")
    other_key, other_pub = S.load_private_key(private), S.load_public_key(public)
    doc = C.Desired(v=1, device="cam-1", version=7, at=1.0,
                    models={"det": C.Assignment(artifact=S.sign(key, artifact()), job="r1")})
    signed = S.sign(key, doc)
    S.verify(pub, signed)
    S.verify([other_pub, pub], signed)  # a device pins several keys while they rotate
    assert C.decode_desired(C.encode(signed), device="cam-1") == signed
    for change in ({"version": 2**62}, {"device": "cam-2"}, {"models": {}}, {"at": 2.0}):
        with pytest.raises(S.SignatureError) as err:
            S.verify([pub, other_pub], signed.model_copy(update=change))
        assert err.value.reason == "bad_signature", change
    for bad, reason in ((doc, "unsigned"), (S.sign(other_key, doc), "bad_signature"),
                        (signed.model_copy(update={"signature": "not base64!"}), "bad_signature")):
        with pytest.raises(S.SignatureError) as err:
            S.verify(pub, bad)
        assert err.value.reason == reason
    assert S.key_id(pub) != S.key_id(other_pub) and len(S.key_id(pub)) == 16


def test_verify_file_checks_size_then_sha256(tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"x" * 10)
    digest = S.sha256_file(path)
    S.verify_file(artifact(sha256=digest, size=10), path)
    with pytest.raises(S.SignatureError, match="10 bytes") as err:
        S.verify_file(artifact(sha256=digest, size=11), path)
    assert err.value.reason == "size"
    path.write_bytes(b"y" * 10)
    with pytest.raises(S.SignatureError) as err:
        S.verify_file(artifact(sha256=digest, size=10), path)
    assert err.value.reason == "sha256"


def test_canonical_bytes_do_not_depend_on_key_order():
    assert C.canonical({"b": 1, "a": [1.5, "é"]}) == C.canonical({"a": [1.5, "é"], "b": 1})
    assert C.canonical({"a": "é"}) == '{"a":"é"}'.encode()


def test_desired_round_trips_and_is_refused_on_another_devices_topic(keys):
    signed = S.sign(keys[0], artifact())
    desired = C.Desired(v=1, device="cam-1", version=4, at=1.0,
                        models={"detector": C.Assignment(artifact=signed, job="r1-cam-1")})
    assert C.decode_desired(C.encode(desired), device="cam-1") == desired
    with pytest.raises(C.ContractError) as err:
        C.decode_desired(C.encode(desired), device="cam-2")
    assert err.value.reason == "wrong_device"


def test_job_status_names_its_own_job_and_a_known_state():
    body = C.JobStatus(v=1, device="cam-1", job="j1", slot="detector", sha256=SHA, state="failed",
                       at=2.0, reason="smoke_test: invoke failed")
    assert C.decode_job(C.encode(body), device="cam-1", job="j1").reason == "smoke_test: invoke failed"
    with pytest.raises(C.ContractError, match="job"):
        C.decode_job(C.encode(body), device="cam-1", job="j2")
    with pytest.raises(C.ContractError) as err:
        C.decode_job(C.encode(body).replace(b'"failed"', b'"exploded"'), device="cam-1", job="j1")
    assert err.value.reason == "schema"


def test_an_artifact_request_may_only_ask_for_data_on_its_own_topic():
    topics = C.Topics()
    ok = C.ArtifactRequest(v=1, device="cam-1", sha256=SHA, offset=0, length=C.MAX_CHUNK_BYTES,
                           request="r1", response_topic=topics.artifact("cam-1", SHA))
    assert topics.artifact_get("cam-1") == "edgecam/v1/dev/cam-1/artifact/get"
    assert C.decode_artifact_request(C.encode(ok), topics, device="cam-1") == ok
    elsewhere = ok.model_copy(update={"response_topic": topics.artifact("cam-2", SHA)})
    for body, device in ((elsewhere, "cam-1"), (ok, "cam-2")):  # aimed at another, or asked on another's topic
        with pytest.raises(C.ContractError) as err:
            C.decode_artifact_request(C.encode(body), topics, device=device)
        assert err.value.reason == "wrong_device"
    with pytest.raises(C.ContractError):
        C.decode_artifact_request(C.encode(ok).replace(b'"length":131072', b'"length":131073'), topics, device="cam-1")


def test_a_chunk_carries_raw_bytes_behind_a_json_line():
    header = C.ChunkHeader(v=1, sha256=SHA, offset=4, total=10, request="r1")
    data = b"\n\x00\xff\n"
    assert C.decode_chunk(C.encode_chunk(header, data)) == (header, data)
    with pytest.raises(C.ContractError, match="total"):
        C.decode_chunk(C.encode_chunk(header, b"x" * 7))
    with pytest.raises(C.ContractError):
        C.decode_chunk(b"no header line at all")


def test_rpc_identity_is_the_topic_level_after_rpc():
    topics = C.Topics("site/x")
    assert topics.rpc_identity(topics.rpc("alice")) == "alice"
    assert topics.rpc_identity("site/x/fleet/rpc/alice/extra") is None
    assert topics.rpc_identity("site/x/dev/cam-1/status") is None
    with pytest.raises(ValueError):
        topics.rpc("a/b")
