"""The report page and its plots, rendered from a summary built here (no MLflow, no browser)."""

from __future__ import annotations

import re

import numpy as np

from components.registry.summary import FamilySummary, RegistrySummary, VersionScore, png_bytes
from components.registry.versions import metric_info
from components.report.page import render_report
from components.report.plots import Series, line_chart, nice_ticks


def family(name: str, champion: int | None) -> FamilySummary:
    grid = png_bytes(np.random.default_rng(0).random((16, 1, 8, 8)))
    return FamilySummary(
        name=f"digits.{name}",
        family=name,
        metric="val_fid",
        info=metric_info("val_fid"),
        champion=champion,
        champion_value=12.5 if champion else None,
        latest=2,
        decision="rejected",
        reason="fid 13 vs champion v1 12.5 (recorded): not better",
        data_version="0123456789abcdef",
        samples_version=champion or 2,
        samples_png=grid,
        real_png=grid,
        scores=[VersionScore(1, 12.5, "promoted"), VersionScore(2, 13.0, "rejected")],
        curves={"generator_loss": [(1, 2.0), (2, 1.5)], "discriminator_loss": [(1, 0.7), (2, 0.6)]},
    )


def test_a_row_per_family_with_embedded_pictures_only():
    page = render_report(RegistrySummary("sqlite:///x.db", "now", [family("gan", 1), family("dcgan", None)]))
    assert re.findall(r'<tr class="family-row" data-family="([^"]+)"', page) == ["gan", "dcgan"]
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "kept champion" in page and "no champion" in page and "FID, validation split" in page


def test_an_empty_registry_says_what_to_do():
    page = render_report(RegistrySummary("sqlite:///x.db", "now", []))
    assert "genpipe run" in page and "<table" not in page


def test_chart_marks_every_point_and_names_each_series():
    chart = line_chart(
        [Series("a", [(1, 1.0), (2, 3.0)], hollow={2}, ringed={1}), Series("b", [(1, 2.0), (2, 2.5)])],
        x_label="epoch",
        y_label="loss",
    )
    assert chart.count("<circle") == 5  # four points and the ring
    assert ">a</text>" in chart and ">b</text>" in chart and 'fill="#fff"' in chart
    assert "no data" in line_chart([Series("a", [])], x_label="x", y_label="y")


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.13, 0.92) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(30.27, 30.27)
    assert ticks[0] <= 30.27 <= ticks[-1]
