"""The plain (non-terminal) form of `genpipe run`'s progress, and the feed that carries it."""

from __future__ import annotations

import datetime as dt

import pytest

from components.evaluation.evaluate import EvaluationProgress
from components.training.trainer import TrainProgress
from flows.progress import PlainProgress, ProgressFeed, stage_line


def test_a_stage_line_has_the_time_the_model_the_stage_and_the_detail():
    when = dt.datetime(2026, 12, 2, 7, 5, 9)
    assert stage_line("vae", "done", "promoted v3", when) == "07:05:09 vae        done        promoted v3"
    assert stage_line("wgan-gp", "training", when=when) == "07:05:09 wgan-gp    training"


def test_plain_form_prints_one_line_per_stage_change_and_what_training_reached():
    lines: list[str] = []
    feed = ProgressFeed()
    with feed.listening(PlainProgress(lines.append)):
        feed.stage("vae", "queued", "no registered version yet")
        feed.stage("vae", "training")
        for step in (0, 7, 20):
            feed.training("vae", TrainProgress(step, 20, 1, 1, 0.25 if step else None, 1234.0))
        feed.stage("vae", "evaluating")
        for done in (1, 6):
            feed.evaluation("vae", EvaluationProgress(done, 6, "test: NLL bound"))
        feed.stage("vae", "registering")
        feed.stage("vae", "done", "promoted v1")
        with pytest.raises(ValueError, match="unknown stage 'trained'"):
            feed.stage("vae", "trained")
    feed.stage("vae", "done", "after the listener left")
    assert [line.split()[1:3] for line in lines] == [
        ["vae", "queued"],
        ["vae", "training"],
        ["vae", "evaluating"],
        ["vae", "registering"],
        ["vae", "done"],
    ]
    assert lines[2].endswith("(trained: step 20/20, epoch 1/1, loss 0.25, 1,234 images/s)")
    assert lines[3].endswith("registering (evaluated: batch 6/6, test: NLL bound)")
    assert lines[4].endswith("done        promoted v1")


def test_stage_lines_go_to_the_log_only_when_no_display_listens():
    feed, logged, shown = ProgressFeed(), [], []
    with feed.logged_unless_watched(logged.append):
        feed.stage("gan", "queued")
    with feed.listening(PlainProgress(shown.append)), feed.logged_unless_watched(logged.append):
        feed.stage("gan", "training")
    feed.stage("gan", "done")
    assert [line.split()[1:] for line in logged] == [["gan", "queued"]]
    assert [line.split()[1:] for line in shown] == [["gan", "training"]]


def test_only_the_named_tool_notices_are_dropped(caplog):
    import logging
    import warnings

    from flows.logs import quiet_tool_notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_tool_notices()
        warnings.warn("The specified dataset source can be interpreted in multiple ways: a, b", stacklevel=1)
        warnings.warn("The specified dataset source does not exist", stacklevel=1)
    assert [str(w.message) for w in caught] == ["The specified dataset source does not exist"]
    ray_auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING, logger=ray_auth.name):
        ray_auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
        ray_auth.warning("Token authentication failed")
    assert [r.getMessage() for r in caplog.records] == ["Token authentication failed"]
