"""The OOD metrics (OOD = positive, higher score = more OOD) against hand-computed cases, ties included, and
against a brute-force count over every pair."""
import itertools

import numpy as np
import pytest

from vqprior.errors import UserError
from vqprior.evaluation.ood import aupr, auroc, fpr_at_tpr, separation


def test_a_hand_computed_case_with_ties():
    inside, outside = [1, 2, 3], [2, 4]
    # pairs (out, in): 2>1, 2=2 (1/2), 2<3, 4 beats all three: 4.5 of 6
    assert auroc(inside, outside) == 0.75
    # thresholds from the top: 4 -> P 1/1 R 1/2; 3 -> P 1/2 R 1/2; 2 (one in, one out tied) -> P 2/4 R 1; 1 -> R 1
    assert aupr(inside, outside) == 0.5 * 1.0 + 0.5 * 0.5
    # 95% of 2 OOD scores: both, so the threshold is 2, which flags the in-scores 2 and 3
    assert fpr_at_tpr(inside, outside) == pytest.approx(2 / 3)


def test_perfect_reversed_and_all_tied_scores():
    assert auroc([0, 1], [2, 3]) == 1.0 and aupr([0, 1], [2, 3]) == 1.0 and fpr_at_tpr([0, 1], [2, 3]) == 0.0
    assert auroc([2, 3], [0, 1]) == 0.0 and fpr_at_tpr([2, 3], [0, 1]) == 1.0
    assert auroc([5, 5, 5], [5, 5]) == 0.5 and aupr([5, 5, 5], [5, 5]) == pytest.approx(2 / 5)


def test_auroc_counts_every_pair_with_ties_as_half():
    rng = np.random.default_rng(0)
    inside, outside = rng.integers(0, 6, 40), rng.integers(2, 8, 30)  # many ties
    pairs = [1.0 if o > i else 0.5 if o == i else 0.0 for i, o in itertools.product(inside, outside)]
    assert auroc(inside, outside) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_fpr_at_tpr_takes_the_highest_threshold_that_flags_95_percent():
    outside = np.arange(100, 200)  # 95 of them are >= 105
    inside = np.arange(0, 110)  # 105..109 reach it
    assert fpr_at_tpr(inside, outside) == 5 / 110


def test_separation_reads_the_shared_columns_and_refuses_empty_or_foreign_tables():
    result = separation({"a": np.array([0.0, 1.0]), "b": np.array([1.0, 2.0])}, {"a": np.array([3.0]),
                                                                              "c": np.array([0.0])})
    assert list(result) == ["a"] and result["a"]["auroc"] == 1.0 and result["a"]["mean_out"] == 3.0
    with pytest.raises(UserError, match="share no score"):
        separation({"a": np.ones(2)}, {"b": np.ones(2)})
    with pytest.raises(UserError, match="at least one"):
        auroc([], [1.0])
    with pytest.raises(UserError, match="finite"):
        auroc([np.nan], [1.0])


def test_the_ood_sets_script_draws_digits_as_rgb_without_changing_a_pixel():
    from conftest import load_script

    sets = load_script("ood_sets")
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rgb = sets.padded_rgb(digits)
    assert rgb.shape == (3, 3, 32, 32) and rgb.dtype == np.uint8
    assert (rgb[:, :, 2:30, 2:30] == digits[:, None]).all() and rgb.sum() == 3 * digits.astype(np.int64).sum()
    constant = sets.synthetic("constant", 4, np.random.default_rng(0))
    assert constant.shape == (4, 3, 32, 32) and (constant == constant[:, :, :1, :1]).all()
    noise = sets.synthetic("noise", 4, np.random.default_rng(0))
    assert noise.dtype == np.uint8 and len(np.unique(noise)) > 200
