"""Which of issue 10's keys a reload may change (proxy.control.reload.plan)."""

from __future__ import annotations

import dataclasses

from proxy.config import ApiKey, AuthConfig, Config, ReplicaConfig, SchedulingConfig
from proxy.control.reload import plan

A = ReplicaConfig(name="a", url="http://10.0.0.1:8000", max_concurrency=4)
BASE = Config(replicas=(A,))


def test_tenant_bounds_default_class_header_and_default_tokens_change_live() -> None:
    new = dataclasses.replace(BASE, scheduling=SchedulingConfig(
        default_class="batch", tenant_header="X-Team", default_max_tokens=64,
        max_queued_per_tenant=5))
    p = plan(BASE, new)
    assert not p.refused
    assert p.changed == {"scheduling"}


def test_the_list_of_classes_needs_a_restart() -> None:
    new = dataclasses.replace(BASE, scheduling=SchedulingConfig(
        classes=("interactive", "batch"), default_class="batch"))
    p = plan(BASE, new)
    assert p.refused and p.fixed == ("scheduling.classes",)
    assert p.refusal() == ("reload refused, nothing applied: scheduling.classes cannot change "
                           "without a restart")


def test_weights_classes_and_bounds_of_keys_change_live() -> None:
    keyed = dataclasses.replace(BASE, auth=AuthConfig(api_keys=(ApiKey("t", "k" * 16),)))
    new = dataclasses.replace(BASE, auth=AuthConfig(api_keys=(
        ApiKey("t", "k" * 16, klass="batch", weight=3, max_queued=2),)))
    p = plan(keyed, new)
    assert not p.refused and p.changed == {"auth"}


def test_models_and_token_budgets_of_a_replica_that_stays_change_live() -> None:
    routed = dataclasses.replace(A, models=("chat",), max_tokens_in_flight=100)
    p = plan(BASE, dataclasses.replace(BASE, replicas=(routed,)))
    assert not p.refused and p.routes == (routed,)
    assert (p.added, p.removed, p.limits) == ((), (), ())
    assert p.summary() == "a models/max_tokens_in_flight"
    auto = dataclasses.replace(routed, models="auto")
    assert plan(dataclasses.replace(BASE, replicas=(routed,)),
                dataclasses.replace(BASE, replicas=(auto,))).routes == (auto,)
    assert plan(BASE, BASE).routes == ()
