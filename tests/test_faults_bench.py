"""benchmarks/faults.py at toy size: its fuzz counts (and that a lost record is counted), its converter escape
attempts, and one kill in the middle of a save, between the rename and the `latest` update."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def spec(tiny_models):
    from fastross.data.images import ImageSpec

    return ImageSpec.from_pretrained(str(tiny_models / "vision"))


def test_fuzz_counts_and_a_lost_record_is_counted(tiny_models, stage2_shards, tmp_path, spec, monkeypatch,
                                                  load_benchmark):
    from fastross.data import convert
    from fastross.tools import faults

    bench = load_benchmark("faults")
    c = bench.Campaign(tmp_path, 0, tiny_models, stage2_shards)
    drawn = faults.fuzz_records(30, 3 * 1_000_003, tmp_path, 0)  # the records fuzz(seed 3) converts
    kinds = {f.kind.split(":")[0] for f in drawn}
    assert {"text", "image", "escape"} <= kinds and len(kinds) >= 10  # the seed really draws a mix
    assert bench.fuzz(c, 30, 3, spec, chunk=30) == {"records": 30, "crashes": 0, "lost": 0, "silent_corruption": 0}
    assert not (tmp_path / "fuzz").exists()

    # A converter that drops one valid record: counted as lost, not passed.
    dropped = next(f.record["id"] for f in drawn if f.expect == faults.VALID)
    real = convert.Converter.prepare

    def drops(self, rid, rec):
        if isinstance(rec, dict) and rec.get("id") == dropped:
            raise convert.Skip("malformed", "dropped by the test")
        return real(self, rid, rec)

    monkeypatch.setattr(convert.Converter, "prepare", drops)
    assert bench.fuzz(c, 30, 3, spec, chunk=30)["lost"] == 1


def test_converter_escapes_are_refused(tiny_models, stage2_shards, tmp_path, capsys, load_benchmark):
    bench = load_benchmark("faults")
    assert bench.converter_escapes(bench.Campaign(tmp_path, 0, tiny_models, stage2_shards)) == 0
    out = capsys.readouterr().out
    assert out.count("FAILED") == 0 and out.count("skipped ({'outside_images_root': 3})") == 3


@pytest.mark.slow
def test_kill_between_rename_and_latest_resumes_exactly(tiny_models, stage2_shards, tmp_path, capsys, monkeypatch,
                                                        load_benchmark):
    """One rank, 4 steps: the reference run, then SIGKILL after step 2's checkpoint folder is renamed and before
    `latest` names it; the resume must start from step 2 (the newest complete checkpoint) and match bit for bit."""
    bench = load_benchmark("faults")
    monkeypatch.setattr(bench, "STEPS", 4)
    monkeypatch.setattr(bench, "SAVE_KILLS", [("renamed", False, (2,))])
    c = bench.Campaign(tmp_path, 0, tiny_models, stage2_shards, ranks=1)
    c.reference()
    assert bench.kill_during_save(c, 0)
    assert "SIGKILL at the renamed of step 2's synchronous save, resumed at step 2, exact" in capsys.readouterr().out
