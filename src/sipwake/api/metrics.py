"""``/metrics``: Prometheus text exposition, rendered from the push service's counters.

No client library: the format is a few lines of text. SIP counters appear when the server
hands the API a reader of them (:attr:`ApiContext.sip_counters`): each ``name → value``
becomes ``sipwake_sip_<name>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sipwake.api.app import ApiContext
from sipwake.api.httpd import Request, Response

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def render(ctx: ApiContext) -> str:
    """The whole exposition text."""
    stats = ctx.push.stats
    lines: list[str] = []
    lines += _family(
        "sipwake_pushes_total",
        "counter",
        "Pushes by provider, kind and result (sent, failed, token-rejected).",
        (
            f"sipwake_pushes_total{_labels(provider=p, kind=k, result=r)} {n}"
            for (p, k, r), n in sorted(stats.results.items())
        ),
    )
    hist: list[str] = []
    for provider, h in sorted(stats.latency.items()):
        for le, count in h.cumulative():
            hist.append(
                f"sipwake_push_latency_seconds_bucket{_labels(provider=provider, le=le)} {count}"
            )
        hist.append(f"sipwake_push_latency_seconds_sum{_labels(provider=provider)} {h.total!r}")
        hist.append(f"sipwake_push_latency_seconds_count{_labels(provider=provider)} {h.count}")
    lines += _family(
        "sipwake_push_latency_seconds",
        "histogram",
        "Time from handing a push to a provider to its answer.",
        hist,
    )
    depth = ctx.push.queue_depth()
    names = sorted({*depth, *(p for p, _, _ in stats.results)})
    lines += _family(
        "sipwake_push_queue_depth",
        "gauge",
        "Pushes handed to a provider and not yet answered.",
        (f"sipwake_push_queue_depth{_labels(provider=p)} {depth.get(p, 0)}" for p in names),
    )
    lines += _family(
        "sipwake_push_rejected_tokens_total",
        "counter",
        "Device tokens the provider declared dead.",
        (
            f"sipwake_push_rejected_tokens_total{_labels(provider=p)} {n}"
            for p, n in sorted(stats.rejected_tokens.items())
        ),
    )
    lines += _family(
        "sipwake_http_requests_total",
        "counter",
        "HTTP API requests by route and status.",
        (
            f"sipwake_http_requests_total{_labels(route=r, status=str(s))} {n}"
            for (r, s), n in sorted(ctx.http_counts.items())
        ),
    )
    limited = ctx.limiter.limited if ctx.limiter is not None else 0
    lines += _family(
        "sipwake_http_rate_limited_total",
        "counter",
        "Requests refused with 429 by the per-key rate limit.",
        [f"sipwake_http_rate_limited_total {limited}"],
    )
    if ctx.sip_counters is not None:
        for name, value in sorted(ctx.sip_counters().items()):
            metric = "sipwake_sip_" + _NAME_RE.sub("_", name)
            kind = "counter" if metric.endswith("_total") else "gauge"
            lines += _family(metric, kind, f"SIP: {name}.", [f"{metric} {value!r}"])
    return "\n".join(lines) + "\n"


async def handle(request: Request) -> Response:
    return Response(render(request.ctx).encode(), 200, {"Content-Type": CONTENT_TYPE})
