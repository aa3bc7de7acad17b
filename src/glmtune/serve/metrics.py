"""`GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4), written here (a
dozen lines) rather than with prometheus_client, which glmtune does not depend on.

- glmtune_requests_total{endpoint, status}: answered requests, by route and HTTP status (a stream counts as its
  first status, 200, even if generation fails later);
- glmtune_prompt_tokens_total, glmtune_generation_tokens_total: tokens of the prompts taken into generation, and
  generated (stop tokens included, as `usage` counts them);
- glmtune_queue_length: requests waiting for the worker; glmtune_batch_size: requests being generated, as the
  worker reports them at scrape time;
- glmtune_time_to_first_token_seconds: from a request's arrival to its first streamed piece of text;
- glmtune_time_per_output_token_seconds: per choice, the time from its first piece to its end over the tokens after
  the first (a piece may carry several tokens, so one observation per choice, not per token).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Routes labelled by name; anything else (a 404's path, which a client chooses) is "other".
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], self.counts, strict=True):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*out, f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


class Metrics:
    """The counters of one app. Updated from the event loop and read by scrapes; a lock keeps each update whole."""

    def __init__(self, queue_length: Callable[[], int], batch_size: Callable[[], int]):
        self.queue_length, self.batch_size = queue_length, batch_size
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.generation_tokens = 0
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.time_per_output_token = Histogram(PER_TOKEN_BUCKETS)
        self._lock = threading.Lock()

    def count_request(self, path: str, status: int) -> None:
        endpoint = "/v1/models" if path.startswith("/v1/models/") else path if path in ENDPOINTS else "other"
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def count_prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def timing(self) -> RequestTiming:
        """A request's clock, started now (its arrival)."""
        return RequestTiming(self)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP glmtune_requests_total Requests answered, by endpoint and HTTP status.",
                     "# TYPE glmtune_requests_total counter"]
            lines += [f'glmtune_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                      for (endpoint, status), count in sorted(self.requests.items())]
            lines += _single("glmtune_prompt_tokens_total", "counter", "Prompt tokens taken into generation.",
                             self.prompt_tokens)
            lines += _single("glmtune_generation_tokens_total", "counter", "Tokens generated.",
                             self.generation_tokens)
            lines += _single("glmtune_queue_length", "gauge", "Requests waiting for the worker.",
                             self.queue_length())
            lines += _single("glmtune_batch_size", "gauge", "Requests being generated.", self.batch_size())
            for name, text, histogram in (
                    ("glmtune_time_to_first_token_seconds", "From a request's arrival to its first text.",
                     self.time_to_first_token),
                    ("glmtune_time_per_output_token_seconds", "A choice's time per token after its first.",
                     self.time_per_output_token)):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *histogram.lines(name)]
        return "\n".join(lines) + "\n"


class RequestTiming:
    """Watches one request's events: its first text (time to first token), each choice's end (its tokens and time
    per token)."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start = metrics, time.monotonic()
        self.first_piece: dict[int, float] = {}  # choice -> when its first piece arrived

    def observe(self, event: Any) -> None:
        now = time.monotonic()
        if isinstance(event, AnswerPiece) and event.index not in self.first_piece:
            with self.metrics._lock:
                if not self.first_piece:
                    self.metrics.time_to_first_token.observe(now - self.start)
                self.first_piece[event.index] = now
        elif isinstance(event, ChoiceEnd):
            with self.metrics._lock:
                self.metrics.generation_tokens += event.completion_tokens
                first = self.first_piece.get(event.index)
                if first is not None and event.completion_tokens > 1:
                    self.metrics.time_per_output_token.observe((now - first) / (event.completion_tokens - 1))


class MetricsMiddleware:
    """Counts every HTTP response by route and status, a 500 raised past the app's handlers included."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self.metrics.count_request(scope["path"], message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if not status:
                self.metrics.count_request(scope["path"], 500)
            raise


def _single(name: str, kind: str, text: str, value: float) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
