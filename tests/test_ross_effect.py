"""benchmarks/ross_effect.py: its statistics against scipy and hand-computed figures, the linear probe on planted
signals and on noise, the ground-truth targets, the final line's format, and one toy-size run end to end (slow)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import yaml
from scipy import stats


def test_paired_interval_is_the_t_interval_of_the_differences(load_benchmark):
    e = load_benchmark("ross_effect")
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 df) = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    d, h = e.paired_interval([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    assert d == pytest.approx(2.0) and h == pytest.approx(2.4841, abs=1e-4)
    # pairing removes what the seeds share: the same shift on very different seeds has no width
    d, h = e.paired_interval([0.1, 0.5, 0.9], [0.2, 0.6, 1.0])
    assert d == pytest.approx(0.1) and h == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(e.paired_interval([0.1], [0.2])[1])  # one seed has no interval
    with pytest.raises(ValueError, match="pair up"):
        e.paired_interval([0.1, 0.2], [0.3])


def test_paired_interval_matches_scipys_paired_t_interval(load_benchmark):
    e = load_benchmark("ross_effect")
    rng = np.random.default_rng(3)
    a = rng.uniform(0.3, 0.6, 5)
    b = a + rng.normal(0.02, 0.03, 5)
    d, h = e.paired_interval(list(a), list(b))
    lo, hi = stats.ttest_rel(b, a).confidence_interval(0.95)
    assert d - h == pytest.approx(lo, abs=1e-12) and d + h == pytest.approx(hi, abs=1e-12)


def test_probe_recovers_a_planted_linear_signal(load_benchmark):
    e = load_benchmark("ross_effect")
    rng = np.random.default_rng(0)
    n, dim = 400, 64
    labels = rng.integers(0, 3, n)
    directions = rng.normal(size=(3, dim))
    x = rng.normal(size=(n, dim)) + 1.5 * directions[labels]  # each class shifted along its own direction
    acc, chance = e.probe_accuracy(x, labels, n // 2)
    assert acc > 0.95 and chance < 0.45
    # a binary label planted in one coordinate among 63 of noise, 4x larger than the noise's spread there
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, dim))
    x[:, 7] += 4.0 * y
    acc, chance = e.probe_accuracy(x, y, n // 2)
    # the best rule (threshold at 2) gets Phi(2) = 0.977; 63 noise features fitted on 200 rows cost a few points
    assert 0.88 < acc <= 0.99 and chance < 0.6


def test_probe_is_at_chance_on_noise(load_benchmark):
    e = load_benchmark("ross_effect")
    rng = np.random.default_rng(1)
    accs = []
    for _ in range(5):
        x, labels = rng.normal(size=(400, 64)), rng.integers(0, 2, 400)
        acc, chance = e.probe_accuracy(x, labels, 200)
        accs.append(acc - chance)
    # 200 held-out rows: one accuracy's standard error is ~0.035; five of them average to within ~0.016 of chance
    assert abs(float(np.mean(accs))) < 0.06


def test_targets_are_the_generators_ground_truth(load_benchmark):
    e = load_benchmark("ross_effect")
    scene = {
        "shapes": [
            {"shape": "circle", "colour": "red", "row": "top", "col": "left"},
            {"shape": "circle", "colour": "blue", "row": "bottom", "col": "right"},
        ]
    }
    t = e.targets([scene])
    assert t["count"].tolist() == [[1]]  # two shapes -> class 1
    assert t["colour"].tolist() == [[1, 0, 1, 0]]  # sorted colours: blue, green, red, yellow
    assert t["shape"].tolist() == [[1, 0, 0]]  # circle, square, triangle
    assert t["position"].tolist() == [[1, 0, 0, 0, 0, 0, 0, 0, 1]]  # top left, bottom right
    p = e.probe(np.random.default_rng(0).normal(size=(40, 8)), e.targets([scene] * 40))
    assert set(p) == {"count", "colour", "shape", "position", "probe"}
    assert p["probe"][1] == pytest.approx(1.0)  # one scene repeated: the majority class is always right


def test_final_line_format(load_benchmark):
    e = load_benchmark("ross_effect")
    line = e.final_line(0.4291, 0.4312, 0.3889, 0.7, 0.75, 3)
    assert line == "ross_effect: acc 0.429->0.431 baseline 0.389 probe 0.700->0.750 seeds 3"


@pytest.mark.slow
def test_toy_run_trains_both_lambdas_probes_and_saves(tmp_path, monkeypatch, load_benchmark):
    e = load_benchmark("ross_effect")
    monkeypatch.setattr(e.R, "RESULTS", tmp_path / "results")  # never into the repository
    work = tmp_path / "work"
    # one seed on one rank keeps it to 4 torchrun launches (the interval's statistics are the tests above); a corpus
    # tokenizer of 320 ids, as the benchmark's default is one (Qwen2's 151k ids made every step, save and answer slower)
    assert (
        e.main(
            [
                "--seeds",
                "1",
                "--epochs1",
                "1",
                "--epochs2",
                "1",
                "--eval-images",
                "1",
                "--train-images",
                "20",
                "--probe-images",
                "20",
                "--ranks",
                "1",
                "--vocab",
                "320",
                "--work",
                str(work),
                "--save",
            ]
        )
        == 0
    )
    for lam in (0, 1):
        for stage in (1, 2):
            cfg = yaml.safe_load((work / f"seed0_lambda{lam}" / f"stage{stage}" / "config.yaml").read_text())
            assert cfg["model"]["recon_weight"] == lam and cfg["train"]["seed"] == 0 and cfg["data"]["seed"] == 0
        summary = json.loads((work / f"seed0_lambda{lam}" / "eval" / "summary.json").read_text())
        assert summary["questions"] >= 9  # one held-out image: its own question, 6 POPE, an MMVP pair
    text = (tmp_path / "results" / "ross_effect.md").read_text()
    final = text.strip().splitlines()[-1].strip()
    assert re.fullmatch(
        r"ross_effect: acc \d\.\d{3}->\d\.\d{3} baseline \d\.\d{3} probe \d\.\d{3}->\d\.\d{3} seeds 1", final
    ), final
    assert "| acc |" in text and "| probe_position |" in text
    assert "+- nan |" in text  # one seed: no interval, said so rather than a zero width


def test_pool_regions_cut_the_visual_grid_into_3_by_3(load_benchmark):
    e = load_benchmark("ross_effect")
    assert [r.tolist() for r in e.pool_regions(64, "mean")] == [list(range(64))]
    regions = e.pool_regions(64, "grid")  # an 8 x 8 grid: rows and columns cut 3, 3, 2
    assert len(regions) == 9 and sorted(np.concatenate(regions).tolist()) == list(range(64))
    assert regions[0].tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18]  # the top-left region
    assert regions[8].tolist() == [54, 55, 62, 63]  # the bottom-right one
    with pytest.raises(ValueError, match="square grid"):
        e.pool_regions(60, "grid")
