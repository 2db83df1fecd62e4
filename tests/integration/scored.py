"""What every registered version of a flow run carries, whatever its family."""

from __future__ import annotations

LIKELIHOOD_FAMILIES = {"fvsbn", "nade", "made", "pixelcnn", "pixelrnn"}


def expected_primary_metric(family: str, pixels: str) -> str:
    """The metric promotion decides on, as the literature compares each kind of model: nats per image
    on binarised images, bits per dimension on 8-bit ones (a bound for the VAE), FID otherwise."""
    unit = "nll" if pixels == "binary" else "bits_per_dim"
    if family in LIKELIHOOD_FAMILIES:
        return unit
    if family == "vae":
        return f"{unit}_bound"
    return "fid"


def assert_scored(family: str, version, pixels: str) -> dict[str, float]:
    """The version carries its family's primary metric on both splits and FID/KID; returns its metrics."""
    metrics = {
        k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")
    }
    assert metrics["test_fid"] >= 0 and metrics["test_kid_mean"] == metrics["test_kid_mean"], family
    primary = expected_primary_metric(family, pixels)
    assert version.tags["primary_metric"] == f"val_{primary}", family
    assert {f"val_{primary}", f"test_{primary}"} <= set(metrics), family
    if primary == "nll":
        assert metrics["test_bits_per_dim"] > 0
    if primary == "fid" and "test_reconstruction_sse" not in metrics:
        assert "test_parzen_ll_estimate" in metrics, family
    return metrics
