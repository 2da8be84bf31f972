"""batchgate_queue_depth{class, model} and batchgate_queue_wait_seconds{class}: one series per
class from startup, bounded model labels."""

from __future__ import annotations

from proxy.core.replicas import Replica
from proxy.core.scheduler import Scheduler
from proxy.observe.metrics import MAX_MODEL_LABELS, Metrics, queue_depths

CLASSES = ("interactive", "standard", "batch")


def test_every_class_is_exported_at_zero_from_startup() -> None:
    metrics = Metrics()
    metrics.watch(Scheduler([Replica("r", "http://r", 1)], 10, classes=3), CLASSES)
    get = metrics.registry.get_sample_value
    for name in CLASSES:
        assert get("batchgate_queue_depth", {"class": name, "model": ""}) == 0
        assert get("batchgate_queue_wait_seconds_count", {"class": name}) == 0


def test_depths_by_class_and_model_with_unknown_models_as_other() -> None:
    depths = {(0, "chat"): 2, (2, None): 1, (2, "mystery"): 4, (2, "late"): 1}
    assert dict(queue_depths(depths, CLASSES, ["chat", "embed"])) == {
        ("interactive", ""): 0, ("standard", ""): 0, ("batch", ""): 1,
        ("interactive", "chat"): 2, ("batch", "other"): 5}


def test_model_labels_are_capped() -> None:
    served = [f"m{i:03d}" for i in range(MAX_MODEL_LABELS + 10)]
    depths = {(0, name): 1 for name in served}
    labels = {model for (_, model), _ in queue_depths(depths, ("c",), served)}
    assert len(labels) == MAX_MODEL_LABELS + 2  # the capped names, "other" and ""
    assert sum(n for _, n in queue_depths(depths, ("c",), served)) == len(served)
