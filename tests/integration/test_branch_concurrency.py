"""`train.max_concurrent_models` holds in a direct call of a flow: the model branches' task runner is
made from the params inside the flow. Real Prefect server; stand-in tasks instead of trainings."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prefect import flow, task

from components.config import load_params
from flows.retrain import training_runner

pytestmark = pytest.mark.integration


class Tally:
    """How many stand-in branches ran at the same time, at most."""

    def __init__(self):
        self.running = self.most = self.done = 0
        self.guard = threading.Lock()


@task
def occupy(tally: Tally) -> None:
    with tally.guard:
        tally.running += 1
        tally.most = max(tally.most, tally.running)
    time.sleep(0.5)
    with tally.guard:
        tally.running -= 1
        tally.done += 1


@flow
def flow_with_branches(limit: int, tally: Tally) -> None:
    params = load_params(
        Path(__file__).resolve().parents[2] / "params.yaml", {"train": {"max_concurrent_models": limit}}
    )
    with training_runner(params) as runner:
        for future in [runner.submit(occupy, {"tally": tally}) for _ in range(4)]:
            future.wait()


@pytest.mark.parametrize("limit", [1, 2])
def test_a_direct_call_of_a_flow_runs_at_most_max_concurrent_models_branches_at_once(prefect_server, limit):
    tally = Tally()
    flow_with_branches(limit, tally)
    assert (tally.done, tally.most) == (4, limit)
