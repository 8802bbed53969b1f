"""The Pareto report against a hand-made example (the front worked out by hand below)."""
from __future__ import annotations

import os

from bmray.actors.tune.report import TrialPoint, dominates, pareto_front, write_report


def point(name, acc, pct, mem, lat, ckpt=None):
    return TrialPoint(trial=name, accuracy=acc, trainable_pct=pct, peak_memory_bytes=mem,
                      latency_ms=lat, params=(("train.lr", 0.1),), checkpoint=ckpt)


# name, accuracy, % trainable, memory, latency          by hand:
POINTS = [
    point("A", 0.90, 1.0, 100, 1.0),    # front
    point("B", 0.80, 2.0, 100, 1.0),    # dominated by A (worse accuracy, more parameters)
    point("C", 0.95, 5.0, 200, 2.0),    # front: the best accuracy
    point("D", 0.70, 0.1, 300, 3.0),    # front: the fewest parameters
    point("E", 0.90, 1.0, 100, 1.0),    # front: equal to A (neither strictly better)
    point("F", 0.85, 1.0, 100, 0.5),    # front: the lowest latency
    point("G", 0.60, 0.1, 300, 3.0),    # dominated by D (same costs, lower accuracy)
    point("H", 0.90, 1.0, 100, 1.5),    # dominated by A (slower, same otherwise)
]


def test_dominance_by_hand():
    a, b, e, h = POINTS[0], POINTS[1], POINTS[4], POINTS[7]
    assert dominates(a, b) and not dominates(b, a)
    assert not dominates(a, e) and not dominates(e, a)
    assert dominates(a, h) and not dominates(h, a)


def test_front_by_hand():
    assert [p.trial for p in pareto_front(POINTS)] == ["C", "A", "E", "F", "D"]


def test_report_files_and_best_delta(tmp_path):
    ckpt = tmp_path / "ckpt_c"
    ckpt.mkdir()
    (ckpt / "delta.safetensors").write_bytes(b"delta-of-C")
    pts = list(POINTS)
    pts[2] = point("C", 0.95, 5.0, 200, 2.0, ckpt=str(ckpt))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    rep = write_report(pts, str(sweep_dir), skipped=["Z"])
    md = open(rep["markdown"]).read()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| trial")}
    assert set(rows) == {p.trial for p in POINTS}
    assert {name for name, line in rows.items() if "| * |" in line} == {"A", "C", "D", "E", "F"}
    assert "stopped before their final report): Z" in md
    with open(rep["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert rep["best"].trial == "C"
    assert (sweep_dir / "best_delta" / "delta.safetensors").read_bytes() == b"delta-of-C"


def test_best_delta_skips_a_trial_whose_checkpoint_is_gone(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "x").write_text("A")
    pts = [point("C", 0.95, 5.0, 200, 2.0, ckpt=str(tmp_path / "deleted")),
           point("A", 0.90, 1.0, 100, 1.0, ckpt=str(kept))]
    rep = write_report(pts, str(tmp_path))
    assert rep["best"].trial == "A"
    assert os.path.exists(tmp_path / "best_delta" / "x")
