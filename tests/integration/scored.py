"""What every registered version of a flow run carries, whatever its family."""

from __future__ import annotations

from components.models.factory import model_class


def assert_scored(family: str, version) -> dict[str, float]:
    """The version carries its family's primary metric on both splits and FID/KID; returns its metrics."""
    metrics = {
        k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")
    }
    assert metrics["test_fid"] >= 0 and metrics["test_kid_mean"] == metrics["test_kid_mean"], family
    primary = model_class(family).primary_metric
    assert version.tags["primary_metric"] == f"val_{primary}", family
    assert {f"val_{primary}", f"test_{primary}"} <= set(metrics), family
    if primary == "nll":
        assert metrics["test_bits_per_dim"] > 0
    if primary == "fid" and "test_reconstruction_sse" not in metrics:
        assert "test_parzen_ll_estimate" in metrics, family
    return metrics
