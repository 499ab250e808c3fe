"""`python main.py serve`: TF Serving's REST API over a real export of a tiny trained run.

The server runs as its own process on a free localhost port; every request
has a timeout, every wait is bounded, and the server is killed in a finally.
The batcher and the JSON format also have fast tests without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from serving.batcher import Batcher, QueueFull, trim
from serving.model import Signature, Tensor
from serving.rest import BadRequest, answer, parse
from tests.conftest import CHILD_ENV, PYTHON, ROOT, run_cli

MODEL = "lm"
TIMEOUT = 60  # seconds, for any one request


# --- a client, with timeouts --------------------------------------------------------------


def request(
    port: int, method: str, path: str, body: bytes | dict | None = None, timeout: float = TIMEOUT
) -> tuple[int, dict]:
    """One HTTP request on a fresh connection: (status, JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def predict(port: int, body: bytes | dict) -> tuple[int, dict]:
    return request(port, "POST", f"/v1/models/{MODEL}:predict", body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(export: pathlib.Path, *options: str):
    """`python main.py serve` on a free port until the block ends; yields (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            PYTHON,
            str(ROOT / "main.py"),
            "serve",
            "--export",
            str(export),
            *options,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env={**os.environ, **CHILD_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "server not healthy within 120 s"
            with contextlib.suppress(OSError):
                if request(port, "GET", "/healthz", timeout=5)[0] == 200:
                    break
            time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tiny_run: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    """`python main.py export` of the shared tiny causal-LM run."""
    out = tmp_path_factory.mktemp("export") / "lm"
    result = run_cli("export", "--run-dir", str(tiny_run), "--out", str(out), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "serving.json").is_file()
    return out


@pytest.fixture(scope="module")
def served(export: pathlib.Path):
    """One server for the tests that leave it running; yields its port.

    No --model-name: the name defaults to the export directory's, which is MODEL.
    """
    with server(export) as (_, port):
        yield port


# --- the command --------------------------------------------------------------------------


def test_bad_command_exits_2_with_one_line(tmp_path: pathlib.Path):
    not_export = tmp_path / "run"
    not_export.mkdir()
    (not_export / "config.json").write_text("{}")
    half = tmp_path / "half"
    half.mkdir()
    (half / "saved_model.pb").write_bytes(b"")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        # the export check comes first, so a real export is needed for the port check
        (half / "serving.json").write_text(json.dumps({"task": "causal_lm", "signatures": {}}))
        cases = {
            "no such directory": ["--export", str(tmp_path / "missing")],
            "no saved_model.pb": ["--export", str(not_export)],
            "port is in use": ["--export", str(half), "--port", port],
            "--max-batch 0": ["--export", str(half), "--max-batch", "0"],
            "--export": [],
        }
        for expected, args in cases.items():
            result = run_cli("serve", *args, cwd=tmp_path, timeout=60)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, (args, result.stderr[-2000:])
            assert len(lines) == 1 and expected in lines[0], (args, result.stderr)
    (half / "serving.json").write_text("not json")
    result = run_cli("serve", "--export", str(half), cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "serving.json: unreadable" in result.stderr


# --- the server, on the real export -------------------------------------------------------


@pytest.mark.slow
def test_endpoints_describe_the_model(served: int):
    assert request(served, "GET", "/v1/models") == (
        200,
        {"models": [{"name": MODEL, "versions": ["1"]}]},
    )
    for path in (f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/1"):
        status, body = request(served, "GET", path)
        assert status == 200
        assert body["model_version_status"][0]["state"] == "AVAILABLE"
    status, body = request(served, "GET", f"/v1/models/{MODEL}/metadata")
    assert status == 200 and body["model_spec"]["name"] == MODEL
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "generate"}
    assert defs["generate"]["inputs"]["max_new_tokens"]["dtype"] == "DT_INT32"
    assert defs["serving_default"]["outputs"]["completions"]["dtype"] == "DT_STRING"
    assert request(served, "GET", "/v1/models/other")[0] == 404


@pytest.mark.slow
def test_row_and_columnar_formats_agree(served: int):
    prompts = ["Return the", "Parse an email message"]
    status, rows = predict(
        served,
        {
            "signature_name": "generate",
            "instances": [{"prompts": p, "max_new_tokens": 5} for p in prompts],
        },
    )
    assert status == 200, rows
    status, columns = predict(
        served,
        {"signature_name": "generate", "inputs": {"prompts": prompts, "max_new_tokens": [5, 5]}},
    )
    assert status == 200, columns
    assert columns["outputs"]["completions"] == [r["completions"] for r in rows["predictions"]]
    assert columns["outputs"]["token_ids"] == [r["token_ids"] for r in rows["predictions"]]
    assert all(len(r["token_ids"]) <= 5 for r in rows["predictions"])
    # a bare string per instance, and the default signature (greedy)
    status, bare = predict(served, {"instances": prompts})
    assert status == 200 and len(bare["predictions"]) == 2
    # 70 rows: more than --max-batch (32), so computed in chunks and joined back
    two = [
        {"prompts": "Return the", "max_new_tokens": 3, "seed": 5},
        {"prompts": "Parse an email message", "max_new_tokens": 9, "seed": -1},
    ]
    status, small = predict(served, {"signature_name": "generate", "instances": two})
    status_big, big = predict(served, {"signature_name": "generate", "instances": two * 35})
    assert (status, status_big) == (200, 200), big

    def unpadded(row: dict) -> tuple:
        return row["completions"], [t for t in row["token_ids"] if t != -1]

    expected = [unpadded(r) for r in small["predictions"]] * 35
    assert [unpadded(r) for r in big["predictions"]] == expected


def _cases() -> list[dict]:
    """The distinct requests of the concurrency test: greedy, sampled, both signatures."""
    prompts = [
        "Return the",
        "Parse an email message.",
        "The number of",
        "Open a file and",
        "a",
        "Raise ValueError",
    ]
    cases = [{"instances": [p]} for p in prompts[:3]]
    for i, p in enumerate(prompts):
        seed = -1 if i % 3 == 0 else i * 7
        row = {"prompts": p, "max_new_tokens": 3 + 5 * i, "seed": seed}
        cases.append({"signature_name": "generate", "instances": [row]})
    two_rows = [{"prompts": p, "max_new_tokens": 6, "seed": 11} for p in prompts[:2]]
    cases.append({"signature_name": "generate", "instances": two_rows})
    return cases


@pytest.mark.slow
def test_concurrent_answers_equal_one_by_one(served: int):
    cases = _cases()
    alone = []
    for body in cases:  # one client: every request runs as its own batch
        status, result = predict(served, body)
        assert status == 200, result
        alone.append(result)
    assert len({json.dumps(a) for a in alone}) > len(cases) // 2  # the cases do differ
    before = request(served, "GET", "/healthz")[1]
    failures: list[str] = []

    def client(c: int) -> None:
        for i in range(10):
            k = (c * 10 + i) % len(cases)
            try:
                status, result = predict(served, cases[k])
            except Exception as e:
                failures.append(f"client {c} request {i}: {type(e).__name__}: {e}")
                continue
            if status != 200 or result != alone[k]:
                failures.append(
                    f"client {c} request {i} (case {k}): {status} {result} != {alone[k]}"
                )

    threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "clients still running after 300 s"
    assert not failures, failures[:5]
    after = request(served, "GET", "/healthz")[1]
    calls, rows = after["model_calls"] - before["model_calls"], after["rows"] - before["rows"]
    assert rows == sum(len(cases[(i) % len(cases)]["instances"]) for i in range(320))
    assert calls < 320 / 2, f"{calls} model calls for 320 requests: no batching"


BAD = [
    (b'{"instances": ', 400, "malformed JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "empty request body"),
    ({"signature_name": "nope", "instances": ["a"]}, 400, "unknown signature_name 'nope'"),
    ({"signature_name": "generate"}, 400, "'instances' (rows) or 'inputs'"),
    ({"signature_name": "generate", "instances": [{"seed": 1}]}, 400, "missing input 'prompts'"),
    ({"instances": [{"prompt": "a"}]}, 400, "unknown input 'prompt'"),
    ({"instances": [1]}, 400, "instances[0].prompts: expected a string"),
    (
        {"signature_name": "generate", "instances": [{"prompts": "a", "max_new_tokens": "5"}]},
        400,
        "instances[0].max_new_tokens: expected an integer",
    ),
    ({"inputs": {"prompts": "a"}}, 400, "inputs.prompts must be a list"),
    ({"instances": []}, 400, "'instances' is empty"),
    ({"instances": ["a"] * 2000}, 400, "the request has 2000 rows"),
    ({"inputs": []}, 400, "'inputs' is empty"),
    ({"instances": ["a" * 10_000_000]}, 413, "max-request-bytes"),
    ('{"instances": ["caf\xe9"]}'.encode("latin-1"), 400, "not UTF-8"),
    (
        {"signature_name": "generate", "instances": [{"prompts": "a", "max_new_tokens": 100_000}]},
        400,
        "over this model's limit",
    ),
    (
        {"signature_name": "generate", "instances": [{"prompts": "a", "max_new_tokens": -1}]},
        400,
        "max_new_tokens must be >= 0",
    ),
    (
        {"signature_name": "generate", "inputs": {"prompts": ["a", "b"], "seed": [1]}},
        400,
        "different numbers of rows",
    ),
]


@pytest.mark.slow
def test_bad_requests_get_4xx_json_errors_and_the_server_goes_on(served: int):
    good = {"instances": ["Return the"]}
    status, expected = predict(served, good)
    assert status == 200
    for body, code, message in BAD:
        status, result = predict(served, body)
        assert status == code and message in result.get("error", ""), (
            body if len(str(body)) < 200 else "...",
            status,
            result,
        )
        assert predict(served, good) == (200, expected)
    status, result = request(served, "GET", f"/v1/models/{MODEL}:predict")
    assert status == 405 and "not allowed" in result["error"]
    status, result = request(served, "POST", "/v1/models/other:predict", {"instances": ["a"]})
    assert status == 404 and "'other' not found" in result["error"]


HEAVY = {
    "signature_name": "generate",
    "instances": [
        {"prompts": f"Return the {i}", "max_new_tokens": 256, "seed": i} for i in range(16)
    ],
}


def _abandon(port: int, half_body: bool, leave: threading.Event | None = None) -> None:
    """A client that goes away: mid-body, or after sending a whole request (when `leave` is set)."""
    body = json.dumps(
        {
            "signature_name": "generate",
            "instances": [{"prompts": "Parse an email", "max_new_tokens": 200}] * 8,
        }
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        s.sendall(body[: len(body) // 2] if half_body else body)
        if leave is None:
            time.sleep(0.05)
        else:
            assert leave.wait(timeout=TIMEOUT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # SO_LINGER 0: the close is a reset, as when a client process dies


@pytest.mark.slow
def test_a_client_leaving_mid_request_harms_no_other(served: int):
    cases = _cases()
    alone = [predict(served, body)[1] for body in cases]
    failures: list[str] = []

    def steady(c: int) -> None:
        for i in range(6):
            k = (c + i) % len(cases)
            try:
                status, result = predict(served, cases[k])
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")
                continue
            if (status, result) != (200, alone[k]):
                failures.append(f"{status} {result}")

    def leaving(c: int) -> None:
        for i in range(4):
            _abandon(served, half_body=(c + i) % 2 == 0)

    threads = [threading.Thread(target=steady, args=(c,)) for c in range(8)]
    threads += [threading.Thread(target=leaving, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:3]
    assert predict(served, cases[0]) == (200, alone[0])
    deadline = time.monotonic() + 60  # the abandoned work drains; nothing stays stuck
    while (health := request(served, "GET", "/healthz")[1])["in_flight"] > 0:
        assert time.monotonic() < deadline, health
        time.sleep(0.2)

    # Then on purpose: a client leaves while its rows compute in one call with others'.
    # A heavy request holds the model; the leaver queues, then 4 others queue behind it;
    # when the heavy call ends they all form the next batch, and the leaver resets mid-call.
    blocker = threading.Thread(target=predict, args=(served, HEAVY))
    leave = threading.Event()
    leaver = threading.Thread(target=_abandon, args=(served, False, leave))
    others = [threading.Thread(target=steady, args=(c,)) for c in range(4)]
    blocker.start()
    time.sleep(0.1)
    leaver.start()
    time.sleep(0.05)
    for t in others:
        t.start()
    blocker.join(timeout=TIMEOUT)
    time.sleep(0.1)  # the shared call is running
    leave.set()
    for t in [leaver, *others]:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in [blocker, leaver, *others])
    assert not failures, failures[:3]


def _rows(n: int, first_seed: int) -> dict:
    """A generate request of n sampled rows, 96 new tokens each: a call of a second or so."""
    rows = [
        {"prompts": f"Return the {i}", "max_new_tokens": 96, "seed": first_seed + i}
        for i in range(n)
    ]
    return {"signature_name": "generate", "instances": rows}


def _wait_for(port: int, done, what: str) -> dict:
    """Poll /healthz until done(health); bounded."""
    deadline = time.monotonic() + 60
    while not done(health := request(port, "GET", "/healthz")[1]):
        assert time.monotonic() < deadline, f"never {what}: {health}"
        time.sleep(0.005)
    return health


@pytest.mark.slow
def test_full_queue_is_503_and_sigterm_finishes_requests_in_flight(export: pathlib.Path):
    """A 32-row call computes, a 20-row request waits; 20 more rows do not fit in a
    queue of 32 (503); then SIGTERM: both accepted requests are answered, exit 0."""
    with server(export, "--max-batch", "32", "--max-queue", "32") as (proc, port):
        results: dict[str, tuple[int, dict] | str] = {}

        def client(name: str, body: dict) -> None:
            try:
                results[name] = predict(port, body)
            except Exception as e:
                results[name] = f"{type(e).__name__}: {e}"

        computing = threading.Thread(target=client, args=("computing", _rows(32, 0)))
        computing.start()
        _wait_for(port, lambda h: h["in_flight"] == 1 and h["queued_rows"] == 0, "computing")
        waiting = threading.Thread(target=client, args=("waiting", _rows(20, 100)))
        waiting.start()
        _wait_for(port, lambda h: h["queued_rows"] == 20, "queued")
        status, refused = predict(port, _rows(20, 200))
        health = request(port, "GET", "/healthz")[1]
        proc.send_signal(signal.SIGTERM)
        for t in (computing, waiting):
            t.join(timeout=120)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    assert status == 503 and "server busy: 20 rows queued" in refused["error"], refused
    # at SIGTERM: both accepted, the first call not yet done
    assert health["in_flight"] == 2 and health["model_calls"] == 0, health
    for name, rows in (("computing", 32), ("waiting", 20)):
        assert isinstance(results[name], tuple) and results[name][0] == 200, results[name]
        assert len(results[name][1]["predictions"]) == rows
    assert "stopping: answering 2 requests in flight" in err and "server stopped" in out


# --- fast tests: the batcher and the JSON format, no server -------------------------------


def _fake_model(calls: list[int], delay: float = 0.02):
    """Echoes row i as token_ids [x, x, ...] (x = the input, x long), padded with -1."""

    def call(signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(delay)
        x = inputs["x"]
        calls.append(len(x))
        if (x < 0).any():
            raise ValueError("negative input")
        width = int(x.max())
        ids = np.full((len(x), width), -1, np.int32)
        for i, v in enumerate(x):
            ids[i, :v] = v
        return {"token_ids": ids}

    return call


def test_batcher_shares_calls_and_answers_each_request_as_alone():
    calls: list[int] = []

    async def main() -> list:
        batcher = Batcher(_fake_model(calls), max_batch=8, timeout_s=0.05, max_queue=64)
        requests = [np.array([v % 5 + 1]) for v in range(20)] + [np.array([2, 9, 1])]
        results = await asyncio.gather(*(batcher.submit("s", {"x": x}, len(x)) for x in requests))
        await batcher.close()
        return list(zip(requests, results, strict=True))

    for x, result in asyncio.run(main()):
        expected = _fake_model([], 0)("s", {"x": x})["token_ids"]
        assert np.array_equal(result["token_ids"], expected), (x, result)
    assert sum(calls) == 23 and len(calls) <= 5 and max(calls) <= 8, calls


def test_batcher_isolates_a_failing_request_and_bounds_its_queue():
    calls: list[int] = []

    async def main() -> tuple[list, str]:
        batcher = Batcher(_fake_model(calls, 0.05), max_batch=4, timeout_s=0.05, max_queue=6)
        good = [batcher.submit("s", {"x": np.array([3])}, 1) for _ in range(3)]
        bad = batcher.submit("s", {"x": np.array([-1])}, 1)
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        try:  # 2 + 5 rows > 6
            first = asyncio.ensure_future(batcher.submit("s", {"x": np.array([1, 1])}, 2))
            await asyncio.sleep(0)
            await batcher.submit("s", {"x": np.ones(5, np.int64)}, 5)
            full = "not refused"
        except QueueFull as e:
            full = str(e)
        await first
        await batcher.close()
        return results, full

    results, full = asyncio.run(main())
    assert [r["token_ids"].tolist() for r in results[:3]] == [[[3, 3, 3]]] * 3
    assert isinstance(results[3], ValueError)
    assert "server busy" in full and "--max-queue 6" in full


def test_trim_keeps_each_requests_own_width():
    batch = np.array([[5, -1, -1], [7, 8, -1]])
    assert trim(batch[:1]).tolist() == [[5]]
    assert trim(batch[1:]).tolist() == [[7, 8]]
    assert trim(np.full((1, 3), -1)).shape == (1, 0)


GENERATE = Signature(
    "generate",
    {
        "prompts": Tensor("string", (None,)),
        "max_new_tokens": Tensor("int32", (None,)),
        "seed": Tensor("int32", (None,)),
    },
    {"completions": Tensor("string", (None,)), "token_ids": Tensor("int32", (None, None))},
)
CLASSIFY = Signature(
    "serving_default",
    {"texts": Tensor("string", (None,))},
    {"labels": Tensor("string", (None,))},
)
META = {"default_max_new_tokens": 32, "max_new_tokens_limit": 256}


def test_rest_format_rows_columns_defaults_and_b64():
    sigs = {"generate": GENERATE, "serving_default": CLASSIFY}
    rows = parse(
        {
            "signature_name": "generate",
            "instances": [{"prompts": "hé"}, {"prompts": {"b64": "aGk="}, "seed": 3}],
        },
        sigs,
        META,
    )
    assert rows.rows == 2 and not rows.columnar
    assert rows.inputs["prompts"].tolist() == ["hé".encode(), b"hi"]
    assert rows.inputs["max_new_tokens"].tolist() == [32, 32] and rows.inputs["seed"].tolist() == [
        -1,
        3,
    ]
    columns = parse({"inputs": ["x", "y", "z"]}, sigs, META)
    assert columns.columnar and columns.rows == 3 and columns.signature is CLASSIFY
    with pytest.raises(
        BadRequest, match=r"instances\[0\].seed: 2147483648 is out of the int32 range"
    ):
        parse(
            {"signature_name": "generate", "instances": [{"prompts": "a", "seed": 2**31}]},
            sigs,
            META,
        )
    with pytest.raises(BadRequest, match="expected an integer, got a boolean"):
        parse(
            {"signature_name": "generate", "instances": [{"prompts": "a", "seed": True}]},
            sigs,
            META,
        )
    outputs = {"labels": np.array([b"x", b"y"], dtype=object)}
    assert answer(outputs, columnar=False) == {"predictions": ["x", "y"]}  # one output: bare values
    assert answer(outputs, columnar=True) == {"outputs": ["x", "y"]}
    two = {"completions": np.array([b"a"], dtype=object), "token_ids": np.array([[1, 2]])}
    assert answer(two, columnar=False) == {
        "predictions": [{"completions": "a", "token_ids": [1, 2]}]
    }
