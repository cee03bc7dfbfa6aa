"""A stand-in Prometheus for tests: a real HTTP server on a loopback port that answers Prometheus'
instant query API (`GET` or `POST /api/v1/query`) from series the test scrapes into it.

Tests write what an exporter exposes, in the Prometheus text exposition format (with optional
millisecond timestamps), and `scrape` it the way Prometheus would: the scrape target's labels
(`job`, `instance`, `namespace`, `pod`, ...) are added, the exporter's own labels win on a clash
(`honor_labels: true`) or are renamed `exported_<name>` (`honor_labels: false`). A query is
evaluated over what was scraped, with a small subset of PromQL: selectors (`name{label="v",
label=~"re", label!="", ...}`), optional range (`[90s]`, `[2m]`), and `or` between them. Instant
vectors take the newest sample of the last 5 minutes, stamped with the evaluation time; range
vectors return the raw samples in the window with their own times, as Prometheus does. Anything
else is answered `400 bad_data`.

Faults: `answer_with(status, body)` replaces every answer, `delay` slows it, `stop()` takes the
server away (connection refused). `queries` records what was asked.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.testing import bind_unused_port

LOOKBACK_S = 300.0

# -- the text exposition format ---------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LINE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})?\s+(\S+)(?:\s+(-?\d+))?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


@dataclass(frozen=True)
class ExposedSample:
    name: str
    labels: dict[str, str]
    value: float
    timestamp_ms: int | None


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_exposition(text: str) -> list[ExposedSample]:
    """The samples of a text exposition (`# HELP`/`# TYPE` and other comments are skipped)."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"exposition line {number}: cannot parse {line!r}")
        name, label_text, value, ts = m.groups()
        labels: dict[str, str] = {}
        rest = (label_text or "").strip()
        while rest:
            lm = _LABEL.match(rest)
            if lm is None:
                raise ValueError(f"exposition line {number}: bad labels {label_text!r}")
            labels[lm.group(1)] = _unescape(lm.group(2))
            rest = rest[lm.end() :].strip()
        samples.append(ExposedSample(name, labels, float(value), int(ts) if ts else None))
    return samples


# -- a PromQL subset --------------------------------------------------------------------------


class BadQuery(Exception):
    pass


@dataclass(frozen=True)
class Selector:
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    range_s: float | None

    def matches(self, labels: Mapping[str, str]) -> bool:
        for label, op, value in self.matchers:
            have = labels.get(label, "")
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
            if op in ("=~", "!~"):
                hit = re.fullmatch(value, have) is not None
                if hit != (op == "=~"):
                    return False
        return True


_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>=~|!~|!=|=)|(?P<punct>[{}\[\],])'
    r"|(?P<dur>\d+[smh](?![a-zA-Z0-9_]))|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*))"
)


def _tokens(query: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    query = query.strip()
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        if m is None or m.end() == pos:
            raise BadQuery(f'parse error at char {pos + 1}: unexpected "{query[pos : pos + 10]}"')
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_query(query: str) -> list[Selector]:
    """`selector ("or" selector)*`; raises `BadQuery` for anything else."""
    tokens = _tokens(query)
    selectors, i = [], 0

    def take(kind: str, text: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens) or tokens[i][0] != kind or (text and tokens[i][1] != text):
            found = tokens[i][1] if i < len(tokens) else "end of input"
            raise BadQuery(f"parse error: unexpected {found!r}")
        i += 1
        return tokens[i - 1][1]

    while True:
        matchers: list[tuple[str, str, str]] = []
        if i < len(tokens) and tokens[i][0] == "name":
            matchers.append(("__name__", "=", take("name")))
        if i < len(tokens) and tokens[i] == ("punct", "{"):
            take("punct", "{")
            while tokens[i] != ("punct", "}"):
                label = take("name")
                op = take("op")
                value = json.loads(take("str"))
                matchers.append((label, op, value))
                if tokens[i] == ("punct", ","):
                    take("punct", ",")
            take("punct", "}")
        if not matchers:
            raise BadQuery("parse error: expected a selector")
        range_s = None
        if i < len(tokens) and tokens[i] == ("punct", "["):
            take("punct", "[")
            duration = take("dur")
            range_s = float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]
            take("punct", "]")
        selectors.append(Selector(tuple(matchers), range_s))
        if i == len(tokens):
            return selectors
        if tokens[i] != ("name", "or"):
            raise BadQuery(f"parse error: unexpected {tokens[i][1]!r}")
        take("name", "or")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it in JSON."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


# -- the server -------------------------------------------------------------------------------


@dataclass
class FakePrometheus:
    honor_labels: bool = True
    #: the labels Prometheus gives every series of the scrape target (a ServiceMonitor's, here
    #: the GPU Operator's dcgm-exporter pod)
    target_labels: dict[str, str] = field(
        default_factory=lambda: {
            "job": "nvidia-dcgm-exporter",
            "instance": "10.42.0.17:9400",
            "namespace": "gpu-operator",
            "pod": "nvidia-dcgm-exporter-7xk2p",
            "container": "nvidia-dcgm-exporter",
            "service": "nvidia-dcgm-exporter",
            "endpoint": "gpu-metrics",
        }
    )
    bearer_token: str | None = None  # when set, answer 401 without it
    ssl_context: ssl.SSLContext | None = None
    #: (time, labels incl. __name__) -> value
    series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = field(
        default_factory=dict
    )
    queries: list[dict[str, str]] = field(default_factory=list)
    answer: tuple[int, bytes, dict[str, str]] | None = None
    stream: tuple[bytes, int] | None = None
    delay: float = 0.0
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: HTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- what the test controls -----------------------------------------------------------------

    def scrape(
        self,
        exposition: str,
        at: float | None = None,
        *,
        job: str | None = None,
    ) -> None:
        """Ingest one scrape of an exporter: samples without a timestamp are stamped `at`
        (default now), in milliseconds as Prometheus stores them."""
        at = math.floor((time.time() if at is None else at) * 1000) / 1000
        target = dict(self.target_labels)
        if job:
            target["job"] = job
        with self._lock:
            for sample in parse_exposition(exposition):
                labels = dict(sample.labels)
                for name, value in target.items():
                    if name in labels and not self.honor_labels:
                        labels[f"exported_{name}"] = labels.pop(name)
                    if name not in labels:
                        labels[name] = value
                labels["__name__"] = sample.name
                t = sample.timestamp_ms / 1000 if sample.timestamp_ms is not None else at
                points = self.series.setdefault(frozenset(labels.items()), [])
                points.append((t, sample.value))
                points.sort()

    def clear(self) -> None:
        with self._lock:
            self.series.clear()
            self.queries.clear()

    def answer_with(self, status: int, body: bytes | str, content_type: str = "") -> None:
        """Answer every request with this status and body from now on."""
        data = body.encode() if isinstance(body, str) else body
        self.answer = (status, data, {"Content-Type": content_type} if content_type else {})

    def answer_streamed(self, chunk: bytes, times: int) -> None:
        """Answer 200 with `chunk` repeated `times` times, chunked (no Content-Length)."""
        self.stream = (chunk, times)

    def answer_normally(self) -> None:
        self.answer = None
        self.stream = None
        self.delay = 0.0

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, query: str, at: float) -> dict[str, Any]:
        selectors = parse_query(query)
        kinds = {s.range_s is None for s in selectors}
        if len(kinds) > 1:
            raise BadQuery("binary expression must contain only instant vectors")
        result: dict[frozenset[tuple[str, str]], dict[str, Any]] = {}
        with self._lock:
            for selector in selectors:
                for key, points in self.series.items():
                    labels = dict(key)
                    if key in result or not selector.matches(labels):
                        continue
                    if selector.range_s is None:
                        recent = [p for p in points if at - LOOKBACK_S < p[0] <= at]
                        if recent:
                            item = {"metric": labels, "value": [at, format_value(recent[-1][1])]}
                            result[key] = item
                    else:
                        window = [p for p in points if at - selector.range_s < p[0] <= at]
                        if window:
                            values = [[round(t, 3), format_value(v)] for t, v in window]
                            result[key] = {"metric": labels, "values": values}
        kind = "vector" if selectors[0].range_s is None else "matrix"
        items = sorted(result.values(), key=lambda r: sorted(r["metric"].items()))
        return {"status": "success", "data": {"resultType": kind, "result": items}}

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> FakePrometheus:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            sock, self.port = bind_unused_port()
            app = web.Application([(r"/api/v1/query", _QueryHandler, {"prom": self})])
            self._server = HTTPServer(app, ssl_options=self.ssl_context)
            self._server.add_sockets([sock])
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-prometheus", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Take the server away: its port refuses connections from now on."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.stop()
            await server.close_all_connections()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._server = None


class _QueryHandler(web.RequestHandler):
    def initialize(self, prom: FakePrometheus) -> None:
        self.prom = prom

    async def get(self) -> None:
        await self._query()

    async def post(self) -> None:
        await self._query()

    async def _query(self) -> None:
        prom = self.prom
        query = self.get_argument("query", "")
        at_text = self.get_argument("time", "")
        prom.queries.append(
            {
                "method": self.request.method or "",
                "query": query,
                "time": at_text,
                "authorization": self.request.headers.get("Authorization", ""),
            }
        )
        if prom.delay:
            await asyncio.sleep(prom.delay)
        if prom.stream is not None:
            chunk, times = prom.stream
            try:
                for _ in range(times):
                    self.write(chunk)
                    await self.flush()
            except StreamClosedError:  # the client stopped reading
                pass
            return
        if prom.answer is not None:
            status, body, headers = prom.answer
            self.set_status(status)
            for name, value in headers.items():
                self.set_header(name, value)
            self.write(body)
            return
        if (
            prom.bearer_token is not None
            and self.request.headers.get("Authorization") != f"Bearer {prom.bearer_token}"
        ):
            self._error(401, "unauthorized", "bad or missing bearer token")
            return
        try:
            at = float(at_text) if at_text else time.time()
            if not query:
                raise BadQuery("parse error: no query")
            answer = prom.evaluate(query, at)
        except (BadQuery, ValueError, re.error) as e:
            self._error(400, "bad_data", str(e))
            return
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(answer))

    def _error(self, status: int, kind: str, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"status": "error", "errorType": kind, "error": message}))
