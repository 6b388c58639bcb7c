"""The project's own `evaluate` modules load by path, offline, and compute exactly."""

from uncurl_hf.evaluation.metrics import available_metrics, load_metric


def test_accuracy_module_loads_offline_and_is_exact(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_metric("accuracy")
    assert metric.compute(predictions=["a", "b", "b", "a"], references=["a", "a", "b", "b"]) == {"accuracy": 0.5}
    assert "accuracy" in available_metrics()
