"""Who may read /metrics: the header rules and the cache; the reviews themselves run against a real API server in
tests/integration/test_prometheus.py."""

from __future__ import annotations

from gpuaas.metrics_server import MetricsAccess, MetricsAuthorizer


class Reviews:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, token: str) -> MetricsAccess:
        self.calls.append(token)
        return MetricsAccess(200, "prometheus may") if token == "good" else MetricsAccess(403, "tenant may not")


def test_a_scrape_without_a_bearer_token_is_refused_without_asking_the_api_server() -> None:
    reviews = Reviews()
    authorize = MetricsAuthorizer(review=reviews, clock=lambda: 0.0)
    for header in (None, "", "Basic dXNlcjpwdw==", "Bearer ", "bearer"):
        assert authorize(header).status == 401
    assert reviews.calls == []


def test_answers_are_cached_a_minute_when_allowed_and_ten_seconds_when_refused() -> None:
    now = [0.0]
    reviews = Reviews()
    authorize = MetricsAuthorizer(review=reviews, clock=lambda: now[0])
    assert authorize("Bearer good").status == 200
    assert authorize("bearer good").status == 200
    assert authorize("Bearer bad").status == 403
    now[0] = 9.0
    assert authorize("Bearer bad").status == 403
    assert reviews.calls == ["good", "bad"]
    now[0] = 11.0
    authorize("Bearer bad")
    assert reviews.calls == ["good", "bad", "bad"]  # a refusal is asked again soon: RBAC may have changed
    now[0] = 59.0
    authorize("Bearer good")
    assert reviews.calls == ["good", "bad", "bad"]
    now[0] = 61.0
    authorize("Bearer good")
    assert reviews.calls == ["good", "bad", "bad", "good"]
