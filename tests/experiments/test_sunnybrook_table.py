"""Sunnybrook evaluation summary: undefined values (EF of a model that predicts no LV) are skipped in the mean,
shown as 'n/a' in the table and written as null, never as NaN, in the JSON."""
import json
import math

import numpy as np

from cinema_jax.experiments.sunnybrook_eval import SUMMARY_KEYS, lv_ed_labelled_as, markdown_table, summarise
from cinema_jax.fileutil import clean_json


def _row(pid, ef, err, edv):
    row = {k: 0.5 for k in SUMMARY_KEYS}
    row.update(pid=pid, pred_lv_ef=ef, lv_ef_abs_err=err, pred_lv_edv=edv, true_lv_ef=21.83)
    return row


def test_summary_skips_undefined_ef():
    rows = [_row("a", float("nan"), float("nan"), 0.0), _row("b", 30.0, 8.17, 120.4)]
    s = summarise(rows)
    assert s["pred_lv_ef"] == 30.0 and s["lv_ef_abs_err"] == 8.17
    assert math.isclose(s["pred_lv_edv"], 60.2)
    assert math.isnan(summarise(rows[:1])["pred_lv_ef"])


def test_table_and_json_have_no_nan():
    rows = [_row("a", float("nan"), float("nan"), 0.0), _row("b", 30.0, 8.17, 120.4)]
    out = {"models": {"m": {"rows": rows, **summarise(rows[:1])}}}
    table = markdown_table(out)
    assert table[2] == "| m | a | 0.500 | 0.500 | 0.500 | 0 / 0 | 0 / 0 | n/a / 21.8 | n/a |"
    assert table[3] == "| m | b | 0.500 | 0.500 | 0.500 | 120 / 0 | 0 / 0 | 30.0 / 21.8 | 8.2 |"
    text = json.dumps(clean_json(out), allow_nan=False)
    assert json.loads(text)["models"]["m"]["pred_lv_ef"] is None


def test_lv_voxels_labelled_as():
    true = np.array([3, 3, 3, 3, 2, 0])
    pred = np.array([0, 2, 2, 3, 3, 1])
    assert lv_ed_labelled_as(pred, true) == {"lv_ed_as_bg": 0.25, "lv_ed_as_rv": 0.0, "lv_ed_as_myo": 0.5,
                                             "lv_ed_as_lv": 0.25}
