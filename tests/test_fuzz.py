"""Fuzzing a real worker process: 10,000 hostile messages of many families change
nothing, crash nothing, are never answered INTERNAL, and cost a bounded log; afterwards
a good batch still trains and SIGTERM still stops the worker with its checkpoint."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import torch

from fedff.v1 import worker_pb2 as pb
from fedff.wire.frames import encode, serialize_frame
from fedff.wire.rpc import SERVICE
from fedff.wire.security import RUN_HEADER
from fedff.wire.state import state_chunks
from test_pipeline import RUN, SPEC, good_batch, small

MESSAGES = int(os.environ.get("FEDFF_FUZZ_MESSAGES", 10_000))
TOKEN = "fuzz-token"
AS_RUN = [("authorization", f"Bearer {TOKEN}"), (RUN_HEADER, RUN)]
ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.UNAUTHENTICATED}


class Exploit:
    """A pickle that would create a file if anything unpickled it with code allowed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def start_worker(tmp_path: Path) -> tuple[subprocess.Popen, str, object]:
    (tmp_path / "token").write_text(TOKEN)
    log = open(tmp_path / "worker.log", "w")  # a file: a full pipe would block the worker
    proc = subprocess.Popen([sys.executable, "-m", "fedff", "worker", "--listen",
                             "127.0.0.1:0", "--ready-file", str(tmp_path / "ready"),
                             "--checkpoint-dir", str(tmp_path / "ckpt"), "--token-file",
                             str(tmp_path / "token"), "--max-params", "2000000"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "worker did not start"
        time.sleep(0.1)
    return proc, (tmp_path / "ready").read_text().strip(), log


@functools.cache
def config_dict() -> str:
    return json.dumps(small().to_dict())


def setup_json(**changes) -> dict:
    setup = {"run": RUN, "config": json.loads(config_dict()), "features": SPEC.features,
             "num_classes": 10, "first": 0, "last": 3, "head": True, "downstream": None}
    setup.update(changes)
    return setup


@functools.cache
def valid_frames(batch_id: int) -> tuple[bytes, ...]:
    return tuple(serialize_frame(f) for f in encode(good_batch(batch_id), 512))


def mutated_frames(rng: random.Random, next_id: int) -> list[bytes]:
    """A valid next batch with one thing wrong: shapes, dtypes, sizes, chunk numbering,
    kinds, n_pos or batch ids."""
    frames = [pb.Frame.FromString(f) for f in valid_frames(next_id)]
    head = frames[0].header
    spec = head.tensors[rng.randrange(len(head.tensors))]
    how = rng.randrange(12)
    if how == 0:
        spec.shape[rng.randrange(len(spec.shape))] = rng.choice([0, 1, 63, 65, 10**9])
    elif how == 1:
        spec.shape.append(rng.choice([1, 2, 3]))
    elif how == 2:
        spec.dtype = rng.choice([d for d in ("float16", "bfloat16", "uint8", "int64",
                                             "float64", "", "x" * 99) if d != spec.dtype])
    elif how == 3:
        head.total_bytes = rng.choice([0, head.total_bytes - 1, head.total_bytes + 4, 2**63])
    elif how == 4:
        f = frames[rng.randrange(len(frames))]
        f.data = f.data[:rng.randrange(len(f.data))] if rng.random() < 0.5 else f.data + b"\0" * 8
    elif how == 5:
        frames[0].chunk = rng.choice([1, 2, 7])
    elif how == 6:
        for f in frames:
            f.chunks = rng.choice([0, len(frames) + 1, 2**31])
    elif how == 7:
        frames = frames[:-1] + frames[:1] if len(frames) > 1 else [frames[0], frames[0]]
    elif how == 8:
        head.kind = rng.choice([0, pb.REPLAY, 9, 1000])
    elif how == 9:
        head.n_pos = rng.choice([0, 5, 9, 2**31])
    elif how == 10:
        bid = rng.choice([0, next_id + 1, next_id + 1000, 2**63])
        for f in frames:
            f.batch_id = bid
    else:
        frames[0].ClearField("header")
    return [f.SerializeToString() for f in frames]


def bad_configure(rng: random.Random) -> tuple[str, grpc.StatusCode]:
    """A CONFIGURE that must be refused, and the code it must get."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    how = rng.randrange(11)
    if how == 0:
        return rng.choice(["", "{", "[]", "null", "1", '"x"', "[" * 5000, "{\"a\":" * 3000]), bad
    if how == 1:
        drop = rng.choice(["config", "features", "first", "last", "head", "num_classes"])
        return json.dumps({k: v for k, v in setup_json().items() if k != drop}), bad
    if how == 2:
        return json.dumps(setup_json(features=rng.choice([-1, 0, "64", None, 10**12]))), bad
    if how == 3:
        first, last = rng.choice([(2, 1), (-1, 3), (0, 4), (5, 9), (3, 3), (0, 10**9)])
        return json.dumps(setup_json(first=first, last=last)), bad
    if how == 4:
        return json.dumps(setup_json(num_classes=rng.choice([0, -3, 10**9, "ten"]))), bad
    if how == 5:
        config = json.loads(config_dict())
        config["model"]["hidden"] = rng.choice([[10**6, 10**6], [-5], [], "big"])
        return json.dumps(setup_json(config=config)), bad
    if how == 6:
        return json.dumps(setup_json(run=rng.choice([None, 3, "", "r" * 500]))), bad
    if how == 7:
        return json.dumps(setup_json(run="someone-else")), grpc.StatusCode.PERMISSION_DENIED
    if how == 8:  # redirect the activations: refused, never contacted
        return (json.dumps(setup_json(last=1, downstream=rng.choice(
            ["attacker.invalid:7001", "0.0.0.0:1", "[::]:9"]))),
            grpc.StatusCode.PERMISSION_DENIED)
    if how == 9:
        return json.dumps(setup_json(head="yes", config={"model": 3})), bad
    return json.dumps(setup_json(config={"train": {"algorithm": "nope"}})), bad


STATES: dict[str, tuple[bytes, ...]] = {}


def state_bytes(state: dict, how: str) -> tuple[bytes, ...]:
    """The worker's own state made wrong: fewer layers, or another run's setup."""
    if how not in STATES:
        wrong = ({**state, "block": {**state["block"], "layers": state["block"]["layers"][:1]}}
                 if how == "wrong-shapes" else {**state, "setup": setup_json(run="another-run")})
        STATES[how] = tuple(c.SerializeToString() for c in state_chunks(wrong))
    return STATES[how]


def bad_state(rng: random.Random, marker: Path, state: dict) -> tuple[list[bytes], object]:
    """SetState chunks that must be refused (and the code they must get, or ANSWERS)."""
    how = rng.randrange(6)
    if how == 0:  # a pickle that runs code
        buf = io.BytesIO()
        torch.save({"setup": setup_json(), "x": Exploit(marker)}, buf, pickle_protocol=2)
        data = buf.getvalue() if rng.random() < 0.5 else pickle.dumps(Exploit(marker))
        return [pb.StateChunk(chunk=0, chunks=1, data=data).SerializeToString()], ANSWERS
    if how == 1:
        return [pb.StateChunk(chunk=rng.choice([1, 5]), chunks=1,
                              data=b"\x80").SerializeToString()], ANSWERS
    if how == 2:  # a readable state of the wrong shapes: nothing may change
        return list(state_bytes(state, "wrong-shapes")), ANSWERS
    if how == 3:
        buf = io.BytesIO()
        torch.save(rng.choice([[1, 2], torch.zeros(3), "state"]), buf)
        return [pb.StateChunk(chunk=0, chunks=1, data=buf.getvalue()).SerializeToString()], \
            ANSWERS
    if how == 4:  # another run's state
        return list(state_bytes(state, "another-run")), grpc.StatusCode.PERMISSION_DENIED
    return [rng.randbytes(rng.randrange(1, 64))], ANSWERS


def undecodable(rng: random.Random, method: str) -> bytes:
    """Random bytes; for the unary methods, ones that do not happen to parse (random
    bytes can spell a valid Control(SHUTDOWN), which the run's own driver may send)."""
    parse = {"Control": pb.ControlRequest.FromString, "GetState": pb.StateRequest.FromString}
    while True:
        data = rng.randbytes(rng.randrange(1, 200))
        try:
            parse.get(method, bytes.__len__)(data)
            if method not in parse:
                return data
        except Exception:  # noqa: BLE001 - what we want: it does not parse
            return data


def read_state(channel: grpc.Channel) -> dict:
    call = channel.unary_stream(f"/{SERVICE}/GetState",
                                request_serializer=pb.StateRequest.SerializeToString,
                                response_deserializer=pb.StateChunk.FromString)
    data = b"".join(c.data for c in call(pb.StateRequest(), timeout=30, metadata=AS_RUN))
    return torch.load(io.BytesIO(data), weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["trained_through"] == b["trained_through"] and a["epoch"] == b["epoch"]
    assert a["acks"] == b["acks"] and a["setup"] == b["setup"]
    for la, lb in zip(a["block"]["layers"], b["block"]["layers"], strict=True):
        for key in la["module"]:
            assert torch.equal(la["module"][key], lb["module"][key]), key


def test_ten_thousand_hostile_messages_change_nothing_and_sigterm_still_stops(tmp_path):
    proc, address, log = start_worker(tmp_path)
    marker = tmp_path / "pwned"
    channel = grpc.insecure_channel(address)
    control = channel.unary_unary(f"/{SERVICE}/Control",
                                  response_deserializer=pb.WorkerStatus.FromString)
    train = channel.stream_stream(f"/{SERVICE}/Train")
    raw = {"Control": channel.unary_unary(f"/{SERVICE}/Control"),
           "GetState": channel.unary_stream(f"/{SERVICE}/GetState"),
           "SetState": channel.stream_unary(f"/{SERVICE}/SetState"),
           "Train": train, "Forward": channel.stream_stream(f"/{SERVICE}/Forward")}
    try:
        request = pb.ControlRequest(command=pb.CONFIGURE, config_json=json.dumps(setup_json()))
        control(request.SerializeToString(), timeout=30, metadata=AS_RUN)
        frames = [serialize_frame(f) for b in (good_batch(1), good_batch(2)) for f in encode(b)]
        list(train(iter(frames), timeout=30, metadata=AS_RUN))
        control(pb.ControlRequest(command=pb.CHECKPOINT).SerializeToString(), timeout=30,
                metadata=AS_RUN)
        checkpoint = tmp_path / "ckpt" / "worker.pt"
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        before = read_state(channel)

        rng, codes, wrong = random.Random(0), Counter(), []
        started = time.monotonic()
        for i in range(MESSAGES):
            family = rng.choice(["bytes", "train", "forward", "configure", "command",
                                 "setstate", "stranger"])
            method, expect, meta = "Control", ANSWERS, AS_RUN
            if family == "bytes":
                method = rng.choice(list(raw))
                body: object = undecodable(rng, method)
                if method not in ("Control", "GetState"):
                    body = iter([body] * rng.randint(1, 3))
            elif family in ("train", "forward"):
                method = "Train" if family == "train" else "Forward"
                body = iter(mutated_frames(rng, 3))
                if family == "forward":
                    expect = ANSWERS | {grpc.StatusCode.OK}  # a batch id is no error there
            elif family == "configure":
                json_text, code = bad_configure(rng)
                body, expect = pb.ControlRequest(command=pb.CONFIGURE,
                                                 config_json=json_text).SerializeToString(), {code}
            elif family == "command":
                body = pb.ControlRequest(command=rng.choice([5, 17, 2**31 - 1])).SerializeToString()
            elif family == "setstate":
                method = "SetState"
                chunks, expect = bad_state(rng, marker, before)
                expect = expect if isinstance(expect, set) else {expect}
                body = iter(chunks)
            else:  # no token, a wrong token, no run, another run: on any method
                method = rng.choice(list(raw))
                meta, expect = rng.choice([
                    ([], {grpc.StatusCode.UNAUTHENTICATED}),
                    ([("authorization", "Bearer guess")], {grpc.StatusCode.UNAUTHENTICATED}),
                    (AS_RUN[:1], {grpc.StatusCode.PERMISSION_DENIED}),
                    ([AS_RUN[0], (RUN_HEADER, "other")], {grpc.StatusCode.PERMISSION_DENIED})])
                frame = valid_frames(3)[0]
                body = {"Control": pb.ControlRequest(command=pb.SHUTDOWN).SerializeToString(),
                        "GetState": b"", "SetState": iter([b""]), "Train": iter([frame]),
                        "Forward": iter([frame])}[method]
            try:
                reply = raw[method](body, timeout=30, metadata=meta)
                if method in ("GetState", "Train", "Forward"):
                    list(reply)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            codes[code] += 1
            if code not in expect:
                wrong.append((i, family, method, code, details[:300]))
        fuzz_seconds = time.monotonic() - started

        assert proc.poll() is None, "the worker died"
        assert not wrong, "\n".join(map(str, wrong[:40]))
        assert codes[grpc.StatusCode.INTERNAL] == codes[grpc.StatusCode.UNKNOWN] == 0, codes
        assert not marker.exists(), "a pickle ran code"
        assert_same_state(read_state(channel), before)
        assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
        frames = [serialize_frame(f) for f in encode(good_batch(3))]
        replies = [pb.TrainReply.FromString(r)
                   for r in train(iter(frames), timeout=30, metadata=AS_RUN)]
        assert any(r.ack.batch_id == 3 for r in replies if r.HasField("ack"))

        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        # seconds, not the 30 s wait: the bound leaves room for a loaded machine
        assert time.monotonic() - stopped < 15 and proc.returncode == 0
        saved = torch.load(checkpoint, weights_only=True)
        assert saved["trained_through"] == 3  # the checkpoint written on the way out
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in text, text[-3000:]
    refusals = [line for line in text.splitlines() if " refused " in line]
    assert 1 <= len(refusals) <= 20 and len(text) < 20_000, (len(refusals), len(text))
    print(f"{MESSAGES} messages in {fuzz_seconds:.1f} s: {dict(codes)}; "
          f"log {len(text.splitlines())} lines")
