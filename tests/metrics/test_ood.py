"""Tests for `tfp_seg.metrics.ood`: out-of-distribution scores."""

import numpy as np
import pytest
import tensorflow as tf

from tests.metrics._references import ref_aupr_fpr95, ref_auroc
from tfp_seg import metrics

# ================================================================================================
# OOD scores
# ================================================================================================


def test_ood_scores_hand_computed():
    # OOD u = 1..20, ID u = [.5, 1.5, 2.5, 10.5, 30].
    # TPR >= .95 needs 19 of 20 OOD flagged -> largest threshold t = 2;
    # ID with u >= 2: {2.5, 10.5, 30} -> FPR95 = 3/5.
    # AUROC: OOD above each ID value: 20 + 19 + 18 + 10 + 0 = 67 of 100 pairs.
    u = np.r_[np.arange(1, 21), [0.5, 1.5, 2.5, 10.5, 30.0]]
    is_ood = np.r_[np.ones(20, bool), np.zeros(5, bool)]
    scores = metrics.ood_scores(u, is_ood)
    assert scores["fpr95"] == pytest.approx(0.6)
    assert scores["auroc"] == pytest.approx(0.67)
    # ties: OOD [1,2], ID [1,0]: pairs (1,1) 1/2, (1,0) 1, (2,1) 1, (2,0) 1 -> 3.5/4
    assert metrics.ood_scores([1, 2, 1, 0], [1, 1, 0, 0])["auroc"] == pytest.approx(0.875)
    # AP: scores 3 (ood), 2 (id), 1 (ood): (R,P) = (.5,1), (.5,.5), (1,2/3)
    # AP = .5*1 + 0*.5 + .5*2/3 = 5/6
    assert metrics.ood_scores([3, 2, 1], [True, False, True])["aupr"] == pytest.approx(5 / 6)


def test_ood_scores_perfect_separation():
    rng = np.random.default_rng(14)
    u = np.r_[rng.uniform(2, 3, 30), rng.uniform(0, 1, 50)]
    is_ood = np.r_[np.ones(30, bool), np.zeros(50, bool)]
    scores = metrics.ood_scores(u, is_ood)
    assert scores == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    reversed_scores = metrics.ood_scores(-u, is_ood)
    assert reversed_scores["auroc"] == 0.0
    assert reversed_scores["fpr95"] == 1.0


def test_ood_scores_match_brute_force():
    rng = np.random.default_rng(15)
    u = np.round(rng.normal(size=(6, 10)), 1)  # rounding creates ties
    is_ood = rng.uniform(size=(6, 10)) < 0.4
    is_ood[0, 0], is_ood[0, 1] = True, False
    scores = metrics.ood_scores(tf.constant(u), is_ood)
    assert scores["auroc"] == pytest.approx(ref_auroc(u[is_ood], u[~is_ood]), abs=1e-12)
    ap, fpr95 = ref_aupr_fpr95(u.reshape(-1), is_ood.reshape(-1))
    assert scores["aupr"] == pytest.approx(ap, abs=1e-12)
    assert scores["fpr95"] == pytest.approx(fpr95, abs=1e-12)
