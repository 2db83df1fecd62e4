"""Progress from Ray workers to the driver (real Ray): every feed of a driver goes through one inbox
actor, and each feed's listener gets that feed's posts only."""

from __future__ import annotations

import pytest
import ray
from conftest import wait_until

from components.cluster import ProgressInbox, ProgressPoster, progress_feed

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
def post(poster, update: dict) -> None:
    poster.post(update)


def test_two_feeds_at_once_share_one_inbox_and_each_hears_only_its_own_posts(ray_instance):
    heard = {"training": [], "evaluation": []}
    with (
        progress_feed(heard["training"].append, dict) as training,
        progress_feed(heard["evaluation"].append, dict) as evaluation,
    ):
        ray.get([post.remote(training, {"step": 3}), post.remote(evaluation, {"phase": "nll"})])
        wait_until(lambda: all(heard.values()), 30, "both posts", interval=0.1)
        assert training.inbox is evaluation.inbox
    assert heard == {"training": [{"step": 3}], "evaluation": [{"phase": "nll"}]}


@ray.remote(num_cpus=0)
def post_a_burst_and_flush(poster, posts: int) -> None:
    """What a training worker does: many posts it never waits for, then `flush` as its work ends."""
    for step in range(posts):
        poster.post({"step": step})
    poster.flush()


def test_the_last_post_of_a_finished_worker_is_heard_and_nothing_stays_in_the_inbox(ray_instance):
    heard = []
    with progress_feed(heard.append, dict) as feed:
        ray.get(post_a_burst_and_flush.remote(feed, 500))
    assert heard and heard[-1] == {"step": 499}, heard[-3:]
    assert ray.get(feed.inbox.take.remote(feed.feed)) is None, "a post landed after the feed was closed"


@ray.remote(num_cpus=0)
def fail_and_flush(poster) -> None:
    """What a training worker does when its training fails: flush as its work ends, then raise."""
    try:
        raise ValueError("the training's own error")
    finally:
        poster.flush()


def test_a_worker_whose_driver_and_inbox_are_gone_raises_its_own_error_not_rays(ray_instance):
    orphan = ProgressPoster(ProgressInbox.remote(), feed=0)
    ray.kill(orphan.inbox)
    with pytest.raises(ValueError, match="the training's own error"):
        ray.get(fail_and_flush.remote(orphan))
