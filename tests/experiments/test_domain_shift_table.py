"""The domain-shift table: means and sample SDs over seeds, the unseen-site mean, one seed without '±'."""

import pytest

from cinema_jax.experiments.domain_shift import markdown_table, summarise


def _cell(d, lv):
    return {"mean_dice": d, "dice_LV": lv}


RUNS = {"0": {"baseline": {"A": _cell(0.9, 0.95), "B": _cell(0.6, 0.7)},
              "chen": {"A": _cell(0.8, 0.85), "B": _cell(0.7, 0.8)}},
        "1": {"baseline": {"A": _cell(0.8, 0.85), "B": _cell(0.8, 0.9)},
              "chen": {"A": _cell(0.8, 0.85), "B": _cell(0.9, 1.0)}}}


def test_summarise_means_and_sample_sd():
    s = summarise(RUNS)
    assert s["baseline"]["A"]["mean_dice"] == pytest.approx(0.85)
    assert s["baseline"]["B"]["mean_dice_sd"] == pytest.approx(0.2 / 2**0.5)  # ddof=1 of (0.6, 0.8)
    assert s["chen"]["A"]["dice_LV_sd"] == pytest.approx(0.0)
    assert "mean_dice_sd" not in summarise({"0": RUNS["0"]})["chen"]["B"]


def test_markdown_table_rows():
    table = markdown_table({"train_site": "A", "arms": summarise(RUNS)}).splitlines()
    assert table[0] == "| arm | site A (train) | site B | unseen sites |"
    assert table[3] == "| chen | 0.800 ± 0.000 (LV 0.850 ± 0.000) | 0.800 ± 0.141 (LV 0.900 ± 0.141) | 0.800 |"
    one = markdown_table({"train_site": "B", "arms": summarise({"0": RUNS["0"]})}).splitlines()
    assert one[2] == "| baseline | 0.900 (LV 0.950) | 0.600 (LV 0.700) | 0.900 |"
