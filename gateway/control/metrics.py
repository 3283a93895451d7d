"""Prometheus text exposition (format 0.0.4) from plain snapshots, without a global registry.

Each subsystem contributes a *collector*: a function returning :class:`Family` values read
from its own state (the proxy's worker counters, the registry, the certbot). ``/metrics``
calls them on each scrape, so no metric is stored twice and nothing is global.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from gateway.control.routes import Endpoint

Kind = Literal["counter", "gauge", "histogram"]
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts (upper bound -> count), plus sum and count."""

    labels: Mapping[str, str]
    buckets: Sequence[tuple[float, int]]
    total: float
    count: int


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    samples: Sequence[Sample | Histogram] = field(default=())

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")


Collector = Callable[[], Iterable[Family]]


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str], extra: tuple[str, str] | None = None) -> str:
    items = list(labels.items()) + ([extra] if extra else [])
    if not items:
        return ""
    for key, _ in items:
        if not _LABEL.match(key) or key.startswith("__"):
            raise ValueError(f"invalid label name {key!r}")
    return "{" + ",".join(f'{k}="{_escape_value(str(v))}"' for k, v in items) + "}"


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The exposition text for ``families`` (names must be unique)."""
    out: list[str] = []
    seen: set[str] = set()
    for fam in families:
        if fam.name in seen:
            raise ValueError(f"duplicate metric family {fam.name!r}")
        seen.add(fam.name)
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for s in fam.samples:
            if isinstance(s, Histogram):
                for bound, count in s.buckets:
                    out.append(f"{fam.name}_bucket{_labels(s.labels, ('le', _num(bound)))} {count}")
                out.append(f"{fam.name}_bucket{_labels(s.labels, ('le', '+Inf'))} {s.count}")
                out.append(f"{fam.name}_sum{_labels(s.labels)} {_num(s.total)}")
                out.append(f"{fam.name}_count{_labels(s.labels)} {s.count}")
            else:
                out.append(f"{fam.name}{_labels(s.labels)} {_num(s.value)}")
    return "\n".join(out) + "\n"


def metrics_endpoint(collectors: Sequence[Collector]) -> Endpoint:
    """``GET /metrics`` over the given collectors (behind the admin listener's auth)."""

    async def handler(_: web.Request) -> web.Response:
        text = render(fam for collect in collectors for fam in collect())
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    return Endpoint("GET", "/metrics", handler, "Prometheus metrics", "metrics", action="get")
