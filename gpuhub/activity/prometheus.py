"""`PrometheusActivitySource`: per-pod GPU readings from NVIDIA dcgm-exporter, through Prometheus.

Once per cycle, one instant query (`POST /api/v1/query`) for every target at once, restricted to
the targets' namespaces; the series are matched to servers by exact (namespace, pod) and turned
into `GpuSample`s by `gpuhub.activity.dcgm`. Whatever goes wrong (Prometheus unreachable, an
error status, an answer that is not JSON or not a result, one larger than `max_answer_bytes`, a
token file that cannot be read) ends as "no readings" for the targets concerned, with a log line
when the problem starts, changes or ends: never an exception out of `sample`, never "idle".

See docs/gpu-activity.md for the dcgm-exporter and Prometheus settings this needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPInputError
from traitlets import Float, Int, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from . import GpuSample, ServerKey, ServerTarget
from .dcgm import (
    DEFAULT_QUERY,
    LABEL_NAME,
    AnswerError,
    build_query,
    parse_answer,
    pods_of,
    readings,
)

MAX_TOKEN_BYTES = 64 * 1024


class AnswerTooLarge(Exception):
    pass


class QueryFailed(Exception):
    pass


class _StopReading(HTTPInputError):
    """Raised in the body callback to drop the connection (an HTTPInputError, so tornado does
    not log it as an uncaught exception)."""


class PrometheusActivitySource(LoggingConfigurable):
    """GPU readings per Kubernetes pod from dcgm-exporter's series in Prometheus."""

    url = Unicode(
        "",
        config=True,
        help="""Base URL of the Prometheus HTTP API (without `/api/v1`), for example
        `http://prometheus-operated.monitoring.svc:9090`, or Thanos Query, or any server that
        answers Prometheus' `/api/v1/query`. Empty: no readings (every server's GPU activity is
        unknown, so no GPU is released as idle).""",
    )

    query = Unicode(
        DEFAULT_QUERY,
        config=True,
        help="""The PromQL sent once per cycle, a template with `$namespaces` (the servers'
        namespaces as a regex alternation), `$window` (`staleness` in seconds, e.g. `90s`),
        `$namespace_label`, `$pod_label` and `$matchers` (`,` and `series_matchers`, or nothing).
        The default selects dcgm-exporter's utilisation and memory series of pods in those
        namespaces over the staleness window (a range selector, so each reading carries the time
        of its scrape). Series must keep their metric names; a query returning an instant
        vector works too, but then a reading's time is the query's and only Prometheus' own
        lookback (5 minutes) limits its age.""",
    )

    namespace_label = Unicode(
        "namespace",
        config=True,
        help="""The label holding a GPU's pod namespace. dcgm-exporter writes `namespace`; when
        Prometheus does not honour the exporter's labels (ServiceMonitor `honorLabels: false`)
        it renames it `exported_namespace`.""",
    )

    pod_label = Unicode(
        "pod",
        config=True,
        help="""The label holding a GPU's pod name: `pod` from dcgm-exporter, `exported_pod` when
        Prometheus does not honour the exporter's labels.""",
    )

    series_matchers = Unicode(
        "",
        config=True,
        help="""Extra PromQL label matchers for the series, e.g. `job="nvidia-dcgm-exporter"`:
        recommended wherever Prometheus also scrapes endpoints users control, so that only the
        exporter's series count.""",
    )

    staleness = Float(
        90.0,
        config=True,
        help="""Seconds: a series whose newest sample is older is no reading. Make it at least
        twice Prometheus' scrape interval of dcgm-exporter plus the exporter's collect interval
        (`-c`, 30 s by default).""",
    )

    timeout = Float(
        10.0,
        config=True,
        help="Seconds a query may take (connecting included); a slower answer is no readings.",
    )

    max_answer_bytes = Int(
        32 * 1024 * 1024,
        config=True,
        help="""Largest answer read, in bytes; a larger one is dropped (no readings). About one
        kilobyte per GPU series and sample in the window.""",
    )

    bearer_token_file = Unicode(
        "",
        config=True,
        help="""A file holding a bearer token sent as `Authorization: Bearer ...` (for example a
        projected service account token in front of an authenticating proxy). Read on every
        query, so a rotated token is picked up. Empty: no Authorization header.""",
    )

    ca_file = Unicode(
        "",
        config=True,
        help="""PEM file of the certificate authorities to trust for an `https` URL (for example
        `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`). Empty: the system's.""",
    )

    @validate("url")
    def _valid_url(self, proposal: dict[str, Any]) -> str:
        value = proposal["value"].strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise TraitError(f"url: must start with http:// or https://, not {value!r}")
        return value

    @validate("query")
    def _valid_query(self, proposal: dict[str, Any]) -> str:
        try:
            build_query(proposal["value"], ["ns"], 60)
        except (KeyError, ValueError) as e:
            raise TraitError(f"query: not a valid template ({e})") from None
        return proposal["value"]

    @validate("namespace_label", "pod_label")
    def _valid_label(self, proposal: dict[str, Any]) -> str:
        if not LABEL_NAME.match(proposal["value"]):
            raise TraitError(f"{proposal['trait'].name}: not a label name: {proposal['value']!r}")
        return proposal["value"]

    @validate("staleness", "timeout")
    def _positive(self, proposal: dict[str, Any]) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"{proposal['trait'].name}: must be > 0")
        return proposal["value"]

    @validate("max_answer_bytes")
    def _valid_cap(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 1024:
            raise TraitError("max_answer_bytes: must be at least 1024")
        return proposal["value"]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client: AsyncHTTPClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._problem: str | None = None

    # -- the activity source ----------------------------------------------------------------------

    async def sample(self, targets: Sequence[ServerTarget]) -> dict[ServerKey, list[GpuSample]]:
        """The latest readings of the targets' GPUs; targets without readings are left out."""
        try:
            return await self._sample(targets)
        except Exception as e:  # a bug here must not stop the service's cycle
            self.log.exception("gpuhub: reading GPU activity from Prometheus failed")
            self._report(f"{type(e).__name__}: {e}")
            return {}

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._loop = None

    # -- plumbing ---------------------------------------------------------------------------------

    async def _sample(self, targets: Sequence[ServerTarget]) -> dict[ServerKey, list[GpuSample]]:
        pods = pods_of(targets)
        if not pods:
            return {}
        if not self.url:
            self._report("no Prometheus URL configured (PrometheusActivitySource.url)")
            return {}
        now = time.time()
        query = build_query(
            self.query,
            {namespace for namespace, _pod in pods},
            self.staleness,
            namespace_label=self.namespace_label,
            pod_label=self.pod_label,
            matchers=self.series_matchers,
        )
        try:
            body = await self._fetch(query, now)
            series = parse_answer(body)
        except (AnswerError, AnswerTooLarge, QueryFailed) as e:
            self._report(str(e))
            return {}
        found = readings(
            series,
            pods,
            now=now,
            staleness_s=self.staleness,
            namespace_label=self.namespace_label,
            pod_label=self.pod_label,
        )
        self._report(None)
        left_out = {
            "stale": found.stale,
            "NaN or invalid": found.invalid,
            "without a UUID label": found.no_device,
        }
        if any(left_out.values()):
            self.log.debug(
                "gpuhub: Prometheus series left out: %s",
                ", ".join(f"{n} {why}" for why, n in left_out.items() if n),
            )
        if not found.matched:
            self.log.debug("gpuhub: Prometheus has no GPU series of the %d pod(s)", len(pods))
        return found.samples

    async def _fetch(self, query: str, now: float) -> bytes:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self.close()
            self._client = AsyncHTTPClient(force_instance=True)
            self._loop = loop
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        if self.bearer_token_file:
            headers["Authorization"] = f"Bearer {self._token()}"
        chunks: list[bytes] = []
        size = 0

        def collect(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > self.max_answer_bytes:
                raise _StopReading("answer too large")
            chunks.append(chunk)

        request = HTTPRequest(
            f"{self.url}/api/v1/query",
            method="POST",
            headers=headers,
            body=urlencode({"query": query, "time": f"{now:.3f}"}),
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
            decompress_response=False,  # the size cap counts what is parsed
            streaming_callback=collect,
            ca_certs=self.ca_file or None,
            user_agent="gpuhub-service",
        )
        error: Exception | None = None
        try:
            response = await self._client.fetch(request, raise_error=False)
        except Exception as e:  # refused, DNS, TLS, the connection dropped for its size ...
            error = e
        if size > self.max_answer_bytes:
            raise AnswerTooLarge(f"answer larger than max_answer_bytes ({self.max_answer_bytes})")
        if error is not None:
            raise QueryFailed(f"cannot reach {self.url}: {type(error).__name__}: {error}")
        if response.code == 599:  # timeout, or no answer at all
            raise QueryFailed(f"cannot reach {self.url}: {response.error}")
        body = b"".join(chunks)
        if response.code != 200:
            raise QueryFailed(f"{self.url} answered {response.code}: {_error_text(body)}")
        return body

    def _token(self) -> str:
        path = Path(self.bearer_token_file)
        try:
            with path.open("rb") as f:
                token = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise QueryFailed(f"cannot read bearer_token_file {path}: {e.strerror}") from None
        if len(token) > MAX_TOKEN_BYTES:
            raise QueryFailed(f"bearer_token_file {path} is larger than {MAX_TOKEN_BYTES} bytes")
        text = token.decode("ascii", "replace").strip()
        if not (text and text.isascii() and text.isprintable()):
            raise QueryFailed(f"bearer_token_file {path} holds no single-line token")
        return text

    def _report(self, problem: str | None) -> None:
        """Log a problem when it starts or changes, and when it ends (not every cycle)."""
        if problem == self._problem:
            return
        if problem is None:
            self.log.info("gpuhub: GPU readings from Prometheus are back")
        else:
            self.log.warning(
                "gpuhub: no GPU readings from Prometheus (GPU activity unknown): %s", problem
            )
        self._problem = problem


def _error_text(body: bytes) -> str:
    """Prometheus' `error` of an error answer, else the start of the body."""
    try:
        parse_answer(body)
    except AnswerError as e:
        if body.lstrip().startswith(b"{"):
            return str(e)
    return body[:200].decode("utf-8", "replace").strip() or "(empty body)"
