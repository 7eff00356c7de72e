"""benchmarks/ross_effect.py: its statistics against hand-computed figures, and one toy-size run end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml


def test_paired_interval_is_the_t_interval_of_the_differences(load_benchmark):
    e = load_benchmark("ross_effect")
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 df) = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    d, h = e.paired_interval([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert d == pytest.approx(2.0) and h == pytest.approx(2.4841, abs=1e-4)
    # pairing removes what the seeds share: the same shift on very different seeds has no width
    d, h = e.paired_interval([0.1, 0.5, 0.9], [0.2, 0.6, 1.0])
    assert d == pytest.approx(0.1) and h == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(e.paired_interval([0.1], [0.2])[1])  # one seed has no interval


def test_answers_at_all_wants_both_answers_and_some_right(load_benchmark):
    e = load_benchmark("ross_effect")

    def s(yes, unknown, acc):
        return {"metrics": {"pope": {"yes_ratio": yes, "unknown_rate": unknown, "accuracy": acc}}}

    assert not e.answers_at_all(s(0.0, 1.0, 0.0))  # "." to everything
    assert not e.answers_at_all(s(1.0, 0.0, 0.5))  # "yes" to everything
    assert not e.answers_at_all(s(0.0, 0.0, 0.5))  # "no" to everything
    assert not e.answers_at_all(s(0.6, 0.4, 0.5))  # yes or unknown, never no
    assert e.answers_at_all(s(0.4, 0.1, 0.6))


@pytest.mark.slow
def test_toy_run_trains_both_lambdas_and_saves(tmp_path, monkeypatch, load_benchmark):
    e = load_benchmark("ross_effect")
    monkeypatch.setattr(e.R, "RESULTS", tmp_path / "results")  # never into the repository
    work = tmp_path / "work"
    # one seed on one rank keeps it to 4 torchrun launches (the interval's statistics are the tests above)
    assert e.main(["--seeds", "1", "--steps-stage1", "1", "--steps-stage2", "1", "--eval-images", "1",
                   "--train-images", "20", "--ranks", "1", "--work", str(work), "--save"]) == 0
    for seed in (0,):
        for lam in (0, 1):
            for stage in (1, 2):
                cfg = yaml.safe_load((work / f"seed{seed}_lambda{lam}" / f"stage{stage}" / "config.yaml").read_text())
                assert cfg["model"]["recon_weight"] == lam and cfg["train"]["seed"] == seed
                assert cfg["data"]["seed"] == seed and cfg["train"]["max_steps"] == 1
            summary = json.loads((work / f"seed{seed}_lambda{lam}" / "eval" / "summary.json").read_text())
            assert summary["questions"] == 9  # one held-out image: its own question, 6 POPE, an MMVP pair
    text = (tmp_path / "results" / "ross_effect.md").read_text()
    final = text.strip().splitlines()[-1].strip()
    assert re.fullmatch(r"ross_effect: pope_f1 \d\.\d{3}->\d\.\d{3} halluc \d\.\d{3}->\d\.\d{3} "
                        r"count \d\.\d{3}->\d\.\d{3} seeds 1", final), final
    assert "| pope_f1 |" in text and "| halluc |" in text and "| count |" in text
    assert "+- nan |" in text  # one seed: no interval, said so rather than a zero width
    assert "no effect measurable" in text  # one step answers nothing
