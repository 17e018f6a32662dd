"""A live server on loopback, driven with the official `openai` client."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import uvicorn

from moeforge.config import get_preset
from moeforge.data.tokenizer import train_tokenizer
from moeforge.model.checkpoint import save_model
from moeforge.model.transformer import Transformer
from moeforge.serve.app import load_server

KEY = "sk-test"


def fetch(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, str]:
    """Plain stdlib HTTP (status, text), for what the openai client cannot send."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn.request(method, u.path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.read().decode()
    conn.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(["def hello(world):\n    return world + 1\n" * 30], 300)
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                     max_position_embeddings=256, eos_token_id=None, **{
                                         "moe.moe_intermediate_size": 32, "attention.q_lora_rank": 32,
                                         "attention.kv_lora_rank": 24})
    return save_model(Transformer(cfg), root / "ckpt", extra_files={"tokenizer.json": root / "tokenizer.json"})


@pytest.fixture(scope="module")
def server(ckpt):
    app = load_server(ckpt, device="cpu", max_batch=4, api_key=KEY, model_name="tiny", max_concurrent=10,
                      speculative=True)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    th.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def test_models_completion_and_chat(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="def hello", max_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    again = client.completions.create(model="tiny", prompt="def hello", max_tokens=7, temperature=0)
    assert again.choices[0].text == r.choices[0].text
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0.8, seed=3)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens <= 5


def test_streaming_matches_non_streaming(client):
    full = client.completions.create(model="tiny", prompt="return", max_tokens=10, temperature=0)
    parts = list(client.completions.create(model="tiny", prompt="return", max_tokens=10, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert parts[-1].usage.completion_tokens == 10
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason == "length"


def test_eight_concurrent_streams(client, server):
    def one(i):
        stream = client.completions.create(model="tiny", prompt="def " * (i + 1), max_tokens=12, temperature=0,
                                           stream=True)
        return "".join(p.choices[0].text for p in stream)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    alone = [client.completions.create(model="tiny", prompt="def " * (i + 1), max_tokens=12,
                                       temperature=0).choices[0].text for i in range(8)]
    assert texts == alone
    metrics = fetch("GET", server[0] + "/metrics")[1]
    assert 'moeforge_requests_total{route="/v1/completions",code="200"}' in metrics
    assert "moeforge_spec_acceptance_rate" in metrics and "moeforge_batch_size_mean" in metrics


def test_errors_are_openai_style_4xx(client, server):
    url = server[0]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="def " * 400, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    h = {"Authorization": f"Bearer {KEY}"}
    for body, status in [(b"{not json", 400), (b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400),
                         (b'{"model": "tiny", "prompt": 5}', 400), (b"[1, 2]", 400),
                         (b'{"model": "tiny", "messages": []}', 400)]:
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        code, text = fetch("POST", url + path, body, h)
        assert code == status, body
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    assert json.loads(fetch("GET", url + "/health")[1])["status"] == "ok"


def test_disconnect_frees_the_slot_and_limit_gives_429(server):
    url, app = server
    worker = app.state.worker
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "def", "max_tokens": 200, "temperature": 0, "stream": True}
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=h)
    r = conn.getresponse()
    assert r.readline().startswith(b"data: ")
    assert worker.in_flight == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(100):  # the client closed the connection mid-stream
        if worker.in_flight == 0:
            break
        time.sleep(0.05)
    assert worker.in_flight == 0 and worker.engine.cache.lengths == [0] * 4
    # over the concurrency limit
    old = worker.max_concurrent
    worker.max_concurrent = 0
    try:
        code, text = fetch("POST", url + "/v1/completions", {"model": "tiny", "prompt": "x"}, h)
        assert code == 429 and json.loads(text)["error"]["type"] == "rate_limit_error"
    finally:
        worker.max_concurrent = old


def test_cli_serve_shuts_down_cleanly_on_ctrl_c(ckpt):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "moeforge", "serve", "--ckpt", str(ckpt), "--port", str(port),
                          "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                if fetch("GET", f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        code, text = fetch("POST", f"http://127.0.0.1:{port}/v1/completions",
                          {"model": ckpt.name, "prompt": "def", "max_tokens": 3})
        assert code == 200 and json.loads(text)["usage"]["completion_tokens"] == 3
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
    assert "Traceback" not in p.stderr.read()


def test_serves_a_deepseek_v4_checkpoint(tmp_path):
    """A V4 checkpoint behind the same server: completions equal the engine's, streaming equals non-streaming,
    concurrent requests equal sequential ones."""
    from moeforge.infer.engine import Engine, SamplingParams
    from moeforge.model.v4 import V4Transformer

    tok = train_tokenizer(["def hello(world):\n    return world + 1\n" * 30], 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = get_preset("tiny-v4").replace(vocab_size=tok.get_vocab_size(), hidden_size=48, eos_token_id=None,
                                        max_position_embeddings=256, **{
                                            "moe.moe_intermediate_size": 16, "moe.n_routed_experts": 8,
                                            "moe.num_experts_per_tok": 2, "v4.head_dim": 16, "v4.qk_rope_head_dim": 8,
                                            "v4.index_head_dim": 8, "v4.sliding_window": 5,
                                            "v4.hca_compress_rate": 8, "v4.o_lora_rank": 8})
    model = V4Transformer(cfg).eval()
    ckpt = save_model(model, tmp_path / "v4", extra_files={"tokenizer.json": tmp_path / "tokenizer.json"})
    app = load_server(ckpt, device="cpu", max_batch=2, model_name="v4")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    try:
        for _ in range(200):
            if srv.started:
                break
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="v4", prompt="def hello", max_tokens=9, temperature=0)
        assert r.usage.completion_tokens == 9
        want = Engine(model, max_batch=1).generate([tok.encode("def hello").ids],
                                                   SamplingParams(max_tokens=9, temperature=0))[0].output
        assert r.choices[0].text == tok.decode(want)
        parts = list(client.completions.create(model="v4", prompt="def hello", max_tokens=9, temperature=0,
                                               stream=True))
        assert "".join(p.choices[0].text for p in parts) == r.choices[0].text

        def one(i):
            return client.completions.create(model="v4", prompt="def " * (i + 1), max_tokens=6,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(one, range(3)))
        assert together == [one(i) for i in range(3)]
    finally:
        srv.should_exit = True
        th.join(10)


def test_server_thread_setting(ckpt):
    """`moeforge serve` leaves one core to the event loop on CPU ("auto"); an explicit count is taken
    as given; a bad one is refused before anything loads."""
    from moeforge.serve.app import serving_threads

    assert [serving_threads(n) for n in (1, 2, 16)] == [1, 1, 15]
    before = torch.get_num_threads()
    try:
        load_server(ckpt, device="cpu", threads="auto")
        assert torch.get_num_threads() == serving_threads(before)
        load_server(ckpt, device="cpu", threads=3)
        assert torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="--threads"):
            load_server(ckpt, device="cpu", threads=0)
    finally:
        torch.set_num_threads(before)
