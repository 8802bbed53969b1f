"""SQuAD EM/F1 on hand-made cases, against the formula written out here."""
import pytest

from bmray.models.qa.squad_metrics import (exact_match, f1_score, normalize_answer,
                                           score_question, squad_evaluate)


def test_normalisation_steps():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("  theatre  anthem ") == "theatre anthem"   # articles only as words
    assert normalize_answer("a") == ""


def test_f1_by_hand():
    # pred tokens: [barack, obama, president] ; gold: [president, barack, h, obama, jr]
    pred, gold = "the President Barack Obama", "Barack H. Obama Jr., president"
    p, r = 3 / 3, 3 / 5   # normalised: "president barack obama" vs "barack h obama jr president"
    assert f1_score(pred, gold) == pytest.approx(2 * p * r / (p + r))
    assert exact_match(pred, gold) == 0.0
    # repeated tokens count with multiplicity: pred [new, new, york], gold [new, york]
    p, r = 2 / 3, 2 / 2
    assert f1_score("new new york", "New York") == pytest.approx(2 * p * r / (p + r))
    assert f1_score("Paris", "London") == 0.0
    assert exact_match("The Paris.", "paris") == 1.0


def test_no_answer_conventions():
    assert f1_score("", "") == 1.0 and exact_match("", "") == 1.0
    assert f1_score("", "Paris") == 0.0
    assert f1_score("Paris", "") == 0.0
    # gold list that normalises to nothing = unanswerable
    assert score_question("", []) == (1.0, 1.0)
    assert score_question("", ["the", "."]) == (1.0, 1.0)
    assert score_question("Paris", []) == (0.0, 0.0)


def test_max_over_golds_and_means():
    em, f1 = score_question("blue whale", ["whale", "the blue whale", "shark"])
    assert em == 1.0 and f1 == 1.0
    em, f1 = score_question("big blue whale", ["whale", "shark"])
    p, r = 1 / 3, 1 / 1
    assert em == 0.0 and f1 == pytest.approx(2 * p * r / (p + r))
    preds = {"a": "big blue whale", "b": "", "c": "x"}
    golds = {"a": ["whale"], "b": [], "c": []}
    out = squad_evaluate(preds, golds)
    assert out["exact"] == pytest.approx(100 * (0 + 1 + 0) / 3)
    assert out["f1"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert out["has_ans_total"] == 1 and out["no_ans_total"] == 2
    assert out["no_ans_exact"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no prediction"):
        squad_evaluate({}, golds)
