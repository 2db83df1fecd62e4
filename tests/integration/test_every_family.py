"""Every model family through the whole flow at once, on real Prefect, Ray, MLflow (SQLite) and DVC.

Its own module: the longest test of the suite, so a parallel run can schedule it beside the others.
"""

from __future__ import annotations

import pytest

from components.registry.models import CHAMPION
from components.registry.tracking import client_for, resolve_tracking_uri
from flows.retrain import retrain

pytestmark = pytest.mark.integration


def test_every_family_trains_through_the_flow_and_is_registered_with_its_scores(
    tmp_path, ray_instance, prefect_server, project_factory
):
    from components.models import list_models
    from components.models.registry import model_class

    project = project_factory(tmp_path / "all")
    families = list_models()
    overrides = {
        "train": {"epochs": 1, "max_concurrent_models": 2},  # epochs 1 wins over train.per_model too
        "evaluate": {"num_samples": 100, "importance_samples": 5},
    }
    state = retrain(project_dir=str(project), models=families, overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    client = client_for(resolve_tracking_uri(None, project))
    for family in families:
        version = client.get_model_version_by_alias(f"digits.{family}", CHAMPION)
        metrics = {
            k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")
        }
        assert metrics["fid"] >= 0 and metrics["kid_mean"] == metrics["kid_mean"], family
        primary = model_class(family).primary_metric
        assert version.tags["primary_metric"] == primary and primary in metrics, family
        if primary == "test_nll":
            assert metrics["test_bits_per_dim"] > 0
        if primary == "fid" and "test_reconstruction_sse" not in metrics:
            assert "test_parzen_ll_estimate" in metrics, family
