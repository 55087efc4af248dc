"""``sparselm serve`` as a user meets it: a real uvicorn process on a free loopback port, spoken to with the
``openai`` client (and raw httpx where the wire format itself is tested). An in-process ASGI transport would buffer
whole responses, so streaming, cancellation and shutdown could not be tested through it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from sparselm.checkpoint.files import save_checkpoint
from sparselm.checkpoint.inference import load_checkpoint
from sparselm.cli import main
from sparselm.config import Config, ModelConfig, MoEConfig
from sparselm.model.generate import SamplingConfig, generate
from sparselm.model.transformer import Transformer
from sparselm.parallel.runtime import Runtime

PROMPT = "It was a dark and stormy night, and the"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random MoE checkpoint (rope, 2 layers, 4 experts top-2) with the tiny tokenizer; long context so that
    cancellation tests have requests that take seconds."""
    cfg = Config(
        model=ModelConfig(
            vocab_size=tiny_tokenizer.vocab_size,
            d_model=64,
            n_layers=2,
            n_heads=4,
            d_ff=128,
            max_seq_len=2048,
            init_std=0.5,
        ),
        moe=MoEConfig(num_experts=4, top_k=2, moe_every=1),
    )
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("serve") / "tiny-moe"
    model = Transformer(cfg.model, cfg.moe)
    save_checkpoint(run, 1, model, cfg, Runtime(cfg, torch.device("cpu")), tokenizer_path=tiny_tokenizer.path)
    return run


def _die_with_parent() -> None:
    """In the server child: get SIGTERM if the test process dies, so no server outlives an aborted test run."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_server(ckpt: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "sparselm", "serve", "--ckpt", str(ckpt), "--port", str(port), "--precision", "fp32"]
    args = [*cmd, "--threads", "1", "--log-level", "warning", *extra]
    log = ckpt.parent / f"server-{port}.log"  # a file, not a pipe: a pipe nobody reads would block the server
    with open(log, "w") as stderr:
        proc = subprocess.Popen(args, stderr=stderr, preexec_fn=_die_with_parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become healthy")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=HANG)


@pytest.fixture(scope="module")
def server(ckpt):
    proc, base = start_server(ckpt, "--max-num-seqs", "4", "--max-queue", "6", "--max-body-bytes", "64KiB")
    yield base
    assert stop(proc) == 0


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=HANG)


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# Only to turn a hang into a failure: generous, since the tests may share a loaded machine. No test passes or fails
# on how fast the server is.
HANG = 600.0


def wait_for(condition, what: str = "the server", timeout: float = HANG) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not get there in {timeout:.0f} s")
        time.sleep(0.05)


def wait_idle(base: str) -> None:
    """Until no block is held and nothing runs or waits (cancelled requests' blocks freed)."""
    wait_for(lambda: metric(base, "sparselm_kv_cache_blocks_used") == 0
             and metric(base, "sparselm_num_requests_running") == 0, "KV blocks being freed")  # fmt: skip


def test_completion_is_what_generate_gives_alone(client, ckpt) -> None:
    model, _, tokenizer = load_checkpoint(ckpt)
    ids = generate(model, [tokenizer.encode(PROMPT)], SamplingConfig(max_new_tokens=12, greedy=True), tokenizer.eod_id)[
        0
    ]
    out = client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny-moe"
    assert out.choices[0].text.strip() == tokenizer.decode(ids).strip()
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and out.usage.completion_tokens == len(ids)
    assert out.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")


def test_streaming_matches_non_streaming_and_ends_with_done(client, server) -> None:
    full = client.completions.create(
        prompt=PROMPT, model="tiny-moe", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(client.completions.create(prompt=PROMPT, model="tiny-moe", max_tokens=20, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=HANG) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    usage_chunk = json.loads(events[-2][6:])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0


def test_chat_streaming_and_not(client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    out = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny-moe",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens
    lp = client.chat.completions.create(
        model="tiny-moe",
        messages=messages,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)


def test_echo_logprobs_match_a_plain_forward(client, ckpt) -> None:
    model, _, tokenizer = load_checkpoint(ckpt)
    prompt_ids = tokenizer.encode(PROMPT)
    out = client.completions.create(
        model="tiny-moe",
        prompt=prompt_ids,
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(prompt_ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    greedy = client.completions.create(
        model="tiny-moe", prompt=prompt_ids, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text.endswith(greedy.choices[0].text)
    with torch.no_grad():
        full = model(torch.tensor([prompt_ids])).logits[0].float().log_softmax(-1)
    expected = [full[i - 1, t].item() for i, t in enumerate(prompt_ids) if i > 0]
    got = lp.token_logprobs[1 : len(prompt_ids)]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])


def test_n_choices_seeded_sampling(client) -> None:
    def ask(seed):
        out = client.completions.create(model="tiny-moe", prompt=PROMPT, max_tokens=8, n=2, seed=seed, temperature=1.0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = ask(3)
    assert len(first) == 2 and first[0] != first[1]
    assert ask(3) == first and ask(4) != first
    batch = client.completions.create(model="tiny-moe", prompt=["One", "Two"], max_tokens=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]


def test_bad_requests_get_openai_errors(client, server) -> None:
    def post(body, **kw):
        return httpx.post(f"{server}/v1/completions", timeout=HANG, **({"json": body} if body is not None else kw))

    r = post(None, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post({"prompt": "x", "max_tokens": "5"})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = post({"prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post({"prompt": "x", "presence_penalty": 1.0})
    assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    r = post({"prompt": "x" * 70_000})
    assert r.status_code == 413
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-moe", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="makes 12 sequences .* at most 10 at once"):
        client.completions.create(model="tiny-moe", prompt=["x", "y"], n=6, max_tokens=1)
    long_prompt = list(range(3, 100)) * 21  # 2,037 tokens of a 2,048 context
    with pytest.raises(openai.BadRequestError, match="context is 2048 tokens, but the prompt has 2037 tokens"):
        client.completions.create(model="tiny-moe", prompt=long_prompt, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="at most 2047"):
        client.completions.create(model="tiny-moe", prompt=list(range(3, 100)) * 22, max_tokens=1)
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["message"] == "Not Found"
    # and the server still serves
    assert client.completions.create(model="tiny-moe", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_disconnect_cancels_and_frees_blocks(server) -> None:
    aborted = metric(server, "sparselm_request_finished_total", '{reason="abort"}')
    body = {"prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=HANG) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_idle(server)
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}  # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(HANG, read=1.0))
    wait_idle(server)
    assert metric(server, "sparselm_request_finished_total", '{reason="abort"}') == aborted + 2


def test_full_queue_answers_429_at_once(server, client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    codes, streams = [], []
    for _ in range(12):  # 4 run, 6 wait, the rest are refused
        request = httpx.Client(timeout=HANG)
        response = request.send(request.build_request("POST", f"{server}/v1/completions", json=body), stream=True)
        codes.append(response.status_code)
        streams.append((request, response))
    try:
        assert codes[:10] == [200] * 10 and codes.count(429) >= 2  # unless a request finished meanwhile
        refused = next(r for _, r in streams if r.status_code == 429)
        refused.read()
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny-moe", prompt="x", max_tokens=1)
    finally:
        for request, response in streams:
            response.close()
            request.close()
    wait_idle(server)


def test_queue_limit_counts_only_sequences_beyond_the_running_places(ckpt) -> None:
    """``--max-queue`` bounds the sequences beyond the ``--max-num-seqs`` running places, however far the engine is
    from its next step. The engine takes new sequences in at the start of a step, so while a step runs (long on a
    loaded machine) new requests sit in its inbox although the batch has free places: counted as waiting, they got
    a 429 from a server far from full (the bounded-load test's flake: 1 running + 6 just arrived, 3 places free).
    The engine process is held still (SIGSTOP) while 11 requests arrive, so 4 places + 6 queued take exactly 10."""
    import uvicorn

    from sparselm.serve.api import ServerConfig, ServerState, create_app
    from sparselm.serve.params import EngineConfig

    engine = EngineConfig(max_num_seqs=4, precision="fp32")
    config = ServerConfig(ckpt=str(ckpt), model_name="tiny-moe", engine=engine, max_queue=6)
    state = ServerState(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, state), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base, streams = f"http://127.0.0.1:{port}", []
    pid = None
    try:
        wait_for(lambda: state.status == "ready" and server.started, "the in-process server")
        pid = state.engine.info.pid
        os.kill(pid, signal.SIGSTOP)  # no engine step from here on: every request stays in the pipe or the inbox
        body = {"prompt": PROMPT, "max_tokens": 3, "stream": True, "ignore_eos": True}
        for _ in range(11):
            http = httpx.Client(timeout=HANG)
            streams.append(
                (http, http.send(http.build_request("POST", f"{base}/v1/completions", json=body), stream=True))
            )
        assert [r.status_code for _, r in streams] == [200] * 10 + [429]
        assert "10 sequences" in streams[-1][1].read().decode()
        os.kill(pid, signal.SIGCONT)
        pid = None
        for _, r in streams[:10]:
            assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        for http, r in streams:
            r.close()
            http.close()
        server.should_exit = True
        thread.join(timeout=HANG)


def test_bounded_load_completes_and_frees_every_block(server) -> None:
    """40 requests from 8 threads: streaming or not, chat or completions, some cancelled mid-stream, some malformed.

    Bounded by counts, not by the clock (the machine may be loaded): 8 clients against 4 running and 6 waiting
    places can only get 429 while a cancelled request still holds its place, so a client that cancels waits until
    the server has counted the abort before it sends again; then at most 8 sequences exist and none is refused.
    Every request must complete (the timeouts only catch a hang)."""
    results, lock = [], threading.Lock()
    aborted_before = metric(server, "sparselm_request_finished_total", '{reason="abort"}')
    cancels = [0]

    def worker(k: int) -> None:
        with httpx.Client(base_url=server, timeout=HANG) as http:
            for i in range(k, 40, 8):
                try:
                    outcome = request(http, i)
                except Exception as exc:  # recorded, so a failure names it instead of silently ending the thread
                    outcome = ("error", repr(exc))
                with lock:
                    results.append(outcome)

    def request(http: httpx.Client, i: int) -> tuple[str, object]:
        if i % 20 == 7:
            r = http.post("/v1/completions", content=b'{"prompt": 5')
            return ("malformed", r.status_code)
        elif i % 10 == 3:
            body = {"prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True}  # ends by abort only
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines), next(lines)
            with lock:
                cancels[0] += 1
            wait_for(lambda: metric(server, "sparselm_request_finished_total", '{reason="abort"}')
                     >= aborted_before + cancels[0])  # fmt: skip
            return ("cancelled", r.status_code)
        else:
            chat = i % 2 == 0
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = {"messages": [{"role": "user", "content": PROMPT}]} if chat else {"prompt": PROMPT[: 5 + i]}
            body.update(max_tokens=5 + i % 13, stream=i % 3 == 0, ignore_eos=True)
            if body["stream"]:
                with http.stream("POST", path, json=body) as r:
                    done = [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
            else:
                r = http.post(path, json=body)
                reply = r.json()
                # ignore_eos ignores the end-of-text token only: a chat reply of a random model that samples
                # the template's stop string "\nUser:" ends there, as it should.
                stopped = chat and reply["choices"][0]["finish_reason"] == "stop"
                done = reply["usage"]["completion_tokens"] == body["max_tokens"] or stopped
            return ("ok", r.status_code if done else -1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HANG)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(results) == 40
    kinds = [kind for kind, _ in results]
    assert kinds.count("malformed") == 2 and kinds.count("cancelled") == 4 and kinds.count("ok") == 34, results
    assert {code for kind, code in results if kind == "malformed"} == {400}
    assert all(code == 200 for kind, code in results if kind != "malformed"), results
    wait_idle(server)
    assert metric(server, "sparselm_request_finished_total", '{reason="abort"}') == aborted_before + 4


def test_health_models_and_metrics(server) -> None:
    for _ in range(2):  # the second finds the first's full blocks in the prefix cache
        httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT * 6, "max_tokens": 2}, timeout=HANG)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"] == "tiny-moe" and models["data"][0]["max_model_len"] == 2048
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "kv_cache_blocks_free",
        "prefix_cache_hits_tokens_total", "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
        "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_count",
    ):  # fmt: skip
        assert f"sparselm_{name}" in text, name
    assert re.search(r'^sparselm_expert_tokens_total\{expert="3",layer="1"\} [1-9]', text, re.MULTILINE)
    assert metric(server, "sparselm_prefix_cache_hits_tokens_total") >= 16


def test_sigterm_drains_in_flight_requests_and_exits_0(ckpt) -> None:
    proc, base = start_server(ckpt, "--drain-timeout", str(HANG))  # a loaded machine may need more than 30 s
    body = {"prompt": PROMPT, "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=HANG) as response:
        lines = response.iter_lines()
        next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 300  # finished, not cut off
    assert proc.wait(timeout=HANG) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=2)


def child_processes(pid: int) -> dict[int, str]:
    """pid -> command line of each child of ``pid`` (read from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def engine_pid(server_pid: int) -> int:
    [pid] = [p for p, cmd in child_processes(server_pid).items() if "spawn_main" in cmd]
    return pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_engine_process_fails_requests_instead_of_hanging(ckpt) -> None:
    proc, base = start_server(ckpt)
    try:
        body = {"prompt": PROMPT, "max_tokens": 1000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=HANG) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(engine_pid(proc.pid), signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert "the engine process exited" in json.loads(rest[-2][6:])["error"]["message"]
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        again = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert again.status_code == 503 and "engine process exited" in again.json()["error"]["message"]
    finally:
        proc.kill()
        proc.wait(timeout=HANG)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_engine_process_ends_with_a_killed_server(ckpt) -> None:
    """SIGKILL leaves the server no chance to stop its engine: the engine process must notice and exit by itself,
    not keep a model's worth of memory and the cores as an orphan."""
    proc, _ = start_server(ckpt)
    children = child_processes(proc.pid)
    assert any("spawn_main" in cmd for cmd in children.values()), children
    proc.kill()
    proc.wait(timeout=HANG)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), "the engine process's exit")


def test_unusable_checkpoints_fail_with_one_line(tmp_path, ckpt, capsys) -> None:
    assert main(["serve", "--ckpt", str(tmp_path / "none")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(ckpt), "--precision", "fp32", "--kv-cache-memory", "256KiB"]) == 2
    assert "one sequence of model.max_seq_len=2048 needs 128" in capsys.readouterr().err
    broken = tmp_path / "broken"
    step = next((ckpt / "checkpoints").iterdir())
    (broken / "checkpoints" / step.name).mkdir(parents=True)
    for f in step.iterdir():
        (broken / "checkpoints" / step.name / f.name).write_bytes(
            f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes()
        )
    port = str(free_port())
    failed = subprocess.run([sys.executable, "-m", "sparselm", "serve", "--ckpt", str(broken), "--port", port],
                            capture_output=True, text=True, timeout=HANG)  # fmt: skip
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].startswith("sparselm: error:")


def test_kernel_caches_are_capped_unless_the_environment_sets_them(monkeypatch) -> None:
    from sparselm.serve.command import KERNEL_CACHE_ENV, bound_kernel_caches

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == KERNEL_CACHE_ENV["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
