"""Exchange.begin, the edge's cheap constructor, makes what the dataclass's own would."""

from __future__ import annotations

import dataclasses

from proxy.observe.exchange import Exchange, Outcome


def test_begin_equals_the_dataclass_constructor() -> None:
    fast = Exchange.begin("rid", "POST", "/v1/completions", "/v1/completions", 12.5, 3.25,
                          "127.0.0.1")
    slow = Exchange(request_id="rid", method="POST", path="/v1/completions",
                    route="/v1/completions", arrival=12.5, started=3.25, client="127.0.0.1")
    assert fast == slow
    # Every field compared (a slot begin forgot would raise, not compare equal).
    assert [getattr(fast, f.name) for f in dataclasses.fields(Exchange)] == \
        [getattr(slow, f.name) for f in dataclasses.fields(Exchange)]
    assert (fast.stage, fast.outcome, fast.klass, fast.bytes_out) == ("queued", Outcome.OK, "", 0)


def test_begin_exchanges_are_independent() -> None:
    first = Exchange.begin("a", "GET", "/", "other", 0.0, 0.0, None)
    second = Exchange.begin("b", "GET", "/", "other", 0.0, 0.0, None)
    first.attempts += 1
    first.end(Outcome.REJECTED, "queue_full")
    assert (second.attempts, second.outcome, second.detail) == (0, Outcome.OK, None)
