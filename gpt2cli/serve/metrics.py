"""Counters, gauges and histograms in Prometheus' text format (no client library needed)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(labels.get(name, "") for name in self.labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.labels and not self.values:
            return [*lines, f"{self.name} 0"]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labels, key)} {_number(value)}")
        return lines


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_number(self.read())}",
        ]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.total += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {_number(self.total)}", f"{self.name}_count {running}"]
        return lines


def _number(value: float) -> str:
    """A value as Prometheus reads it, exactly: a whole number in full (`:g` would print
    1024983 as 1.02498e+06, losing increments), anything else as Python's shortest repr."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{v}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


class Metrics:
    """What /metrics shows. The scheduler's gauges are read when scraped."""

    def __init__(self, scheduler=None):
        self.requests = Counter(
            "gpt2_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter(
            "gpt2_prompt_tokens_total", "Prompt tokens of served (answered) requests."
        )
        self.generated_tokens = Counter("gpt2_generated_tokens_total", "Tokens generated.")
        self.cancelled = Counter(
            "gpt2_cancelled_total", "Requests cancelled because their client disconnected."
        )
        self.prefix_hits = Counter(
            "gpt2_prefix_cache_hits_total", "Choices whose prompt started from the prefix cache."
        )
        self.prefix_tokens = Counter(
            "gpt2_prefix_cache_tokens_total", "Prompt tokens taken from the prefix cache, not read."
        )
        self.first_token = Histogram(
            "gpt2_time_to_first_token_seconds", "From queueing a choice to its first token."
        )
        self.queue_wait = Histogram("gpt2_queue_wait_seconds", "Time a choice waited for a row.")
        self.duration = Histogram(
            "gpt2_request_duration_seconds", "Generation requests, end to end."
        )
        self.gauges = []
        if scheduler is not None:
            self.gauges = [
                Gauge(
                    "gpt2_queue_length",
                    "Choices waiting for a row.",
                    lambda: scheduler.queue_length,
                ),
                Gauge(
                    "gpt2_busy_rows", "Rows generating or prefilling.", lambda: scheduler.busy_rows
                ),
                Gauge(
                    "gpt2_block_rows",
                    "Rows in the compiled block now running.",
                    lambda: scheduler.block_rows,
                ),
                Gauge(
                    "gpt2_block_length",
                    "Cache slots per row in the block now running.",
                    lambda: scheduler.block_length,
                ),
                Gauge(
                    "gpt2_prefix_cache_bytes",
                    "Bytes of keys and values the prefix cache holds (--prefix-cache-mb).",
                    lambda: scheduler.prefix.nbytes,
                ),
                Gauge(
                    "gpt2_prefix_cache_entries",
                    "Token sequences the prefix cache holds.",
                    lambda: scheduler.prefix.entries,
                ),
                Gauge(
                    "gpt2_max_batch", "Rows available (--max-batch).", lambda: scheduler.max_batch
                ),
                Gauge(
                    "gpt2_batch_occupancy",
                    "Busy rows / --max-batch.",
                    lambda: scheduler.busy_rows / scheduler.max_batch,
                ),
                Gauge(
                    "gpt2_programs_compiled",
                    "Programs compiled (each block shape's decode, prefill, copies).",
                    lambda: scheduler.programs_compiled,
                ),
                Gauge(
                    "gpt2_programs_waiting",
                    "Programs the background warm-up has still to compile.",
                    lambda: scheduler.programs_waiting,
                ),
            ]

    def render(self) -> str:
        lines = []
        for metric in (
            self.requests,
            self.prompt_tokens,
            self.generated_tokens,
            self.cancelled,
            self.prefix_hits,
            self.prefix_tokens,
            self.first_token,
            self.queue_wait,
            self.duration,
            *self.gauges,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
