"""``edgepack serve --cors-origin``: browser front ends on another origin, checked with raw HTTP and with real Chromium.

One server (SmolLM2 Q4_1, an API key) allows one page origin. The HTTP tests
look at the headers a browser decides by; the Chromium tests load a page from a
second local server and let the browser itself allow or block its fetches.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

KEY = "sk-cors-test"
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 8}


class Pages:
    """A local web server for the browser's page: ``GET /`` is the page, ``POST /result`` is where it reports."""

    def __init__(self) -> None:
        self.page = ""
        self.results: list[dict] = []
        pages = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                pages.results.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def pages():
    p = Pages()
    yield p
    p.httpd.shutdown()


@pytest.fixture(scope="module")
def origin(pages) -> str:
    return f"http://127.0.0.1:{pages.port}"


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory, edgepack_serve, origin):
    flags = ["--api-key", KEY, "--cors-origin", origin, "--cors-origin", "http://desktop.example:3000", "--n-ctx", "512"]
    with edgepack_serve(smollm2_gguf, tmp_path_factory.mktemp("cors"), *flags) as (base, _):
        yield base


def _preflight(server: str, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    return httpx.options(f"{server}{path}", headers=headers, timeout=10, trust_env=False)


# -- the headers -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_preflight_for_a_listed_origin_needs_no_key(server, origin):
    for allowed in (origin, "http://desktop.example:3000"):
        r = _preflight(server, allowed)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == allowed
        assert {"GET", "POST"} <= {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
        assert "authorization" in r.headers["access-control-allow-headers"].lower()  # the key may be sent
        assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()  # and the openai JS client's own headers


@pytest.mark.slow
def test_preflight_for_another_origin_is_refused(server):
    for other in ("http://127.0.0.1:1", "http://evil.example", "null"):
        r = _preflight(server, other)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, (other, r.headers)


@pytest.mark.slow
def test_answers_and_errors_carry_the_origin_only_for_listed_origins(server, origin):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers={**auth, "Origin": origin}, timeout=60, trust_env=False)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert r.headers["access-control-allow-origin"] == origin and "Origin" in r.headers["vary"]
    denied = httpx.get(f"{server}/v1/models", headers={"Origin": origin}, timeout=10, trust_env=False)
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin  # a page can read why
    bad = httpx.post(f"{server}/v1/chat/completions", json={"messages": "hi"}, headers={**auth, "Origin": origin}, timeout=10, trust_env=False)
    assert bad.status_code == 400 and bad.headers["access-control-allow-origin"] == origin
    other = httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers={**auth, "Origin": "http://evil.example"}, timeout=60, trust_env=False)
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers  # served, but no browser will show it


@pytest.mark.slow
def test_the_openai_client_streams_with_an_origin_header(server, origin):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=120, max_retries=0, default_headers={"Origin": origin},
                           http_client=httpx.Client(trust_env=False))
    raw = client.chat.completions.with_raw_response.create(model="any", stream=True, **CHAT)
    assert raw.headers["access-control-allow-origin"] == origin
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == client.chat.completions.create(model="any", **CHAT).choices[0].message.content


# -- a real browser --------------------------------------------------------------------------------
PAGE = """<!doctype html><meta charset="utf-8"><title>cors</title><script>
(async () => {
  const out = {origin: location.origin};
  try {
    const r = await fetch("%(server)s/v1/chat/completions", {method: "POST", body: JSON.stringify(%(chat)s),
      headers: {"Authorization": "Bearer %(key)s", "Content-Type": "application/json"}});
    out.status = r.status;
    out.body = await r.text();
  } catch (e) { out.error = String(e); }
  try {
    const r = await fetch("%(server)s/v1/models", {headers: {"Authorization": "Bearer wrong"}});
    out.unauthorized = {status: r.status, body: await r.json()};
  } catch (e) { out.unauthorized = {error: String(e)}; }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})();
</script>"""


def _in_chromium(pages: Pages, url: str, tmp_path) -> dict:
    """Open ``url`` in headless Chromium and return what its page reported."""
    chromium = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium): cannot test CORS in a browser")
    before = len(pages.results)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", "--no-proxy-server", f"--user-data-dir={tmp_path / 'chromium-profile'}", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(pages.results) == before:
            assert proc.poll() is None, f"Chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the page reported nothing within 120 s"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return pages.results[-1]


@pytest.mark.slow
def test_a_page_on_the_listed_origin_streams_an_answer_in_chromium(server, pages, origin, tmp_path):
    pages.page = PAGE % {"server": server, "key": KEY, "chat": json.dumps({**CHAT, "stream": True})}
    out = _in_chromium(pages, f"{origin}/", tmp_path)
    assert out["origin"] == origin and out.get("status") == 200, out
    events = [line[6:] for line in out["body"].splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(c["delta"].get("content", "") for e in events[:-1] for c in json.loads(e)["choices"])
    whole = httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, trust_env=False)
    assert text and text == whole.json()["choices"][0]["message"]["content"]
    assert out["unauthorized"]["status"] == 401 and out["unauthorized"]["body"]["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
def test_chromium_blocks_a_page_on_another_origin(server, pages, tmp_path):
    """The same page from http://localhost:PORT (another origin than 127.0.0.1:PORT) may not read the API."""
    pages.page = PAGE % {"server": server, "key": KEY, "chat": json.dumps(CHAT)}
    out = _in_chromium(pages, f"http://localhost:{pages.port}/", tmp_path)
    assert out["origin"] == f"http://localhost:{pages.port}"
    assert "status" not in out and "Failed to fetch" in out["error"], out
    assert "Failed to fetch" in out["unauthorized"]["error"]
