"""benchmarks/faults.py at toy size: its fuzz counts (and that a lost record is counted), its converter escape
attempts, and one kill in the middle of a save, between the rename and the `latest` update."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def spec(tiny_models):
    from fastross.data.images import ImageSpec

    return ImageSpec.from_pretrained(str(tiny_models / "vision"))


def test_fuzz_counts_and_a_lost_record_is_counted(
    tiny_models, stage2_shards, tmp_path, spec, monkeypatch, load_benchmark
):
    from devtools import faults
    from fastross.data import convert

    bench = load_benchmark("faults")
    c = bench.Campaign(tmp_path, 0, tiny_models, stage2_shards)
    base = faults.BASE_KINDS  # the record-level kinds (the JSON and format families: test_fuzz_families_...)
    drawn = faults.fuzz_records(30, 3 * 1_000_003, tmp_path, 0, base)  # the records fuzz(seed 3) converts
    kinds = {f.kind.split(":")[0] for f in drawn}
    assert {"text", "image", "escape"} <= kinds and len(kinds) >= 10  # the seed really draws a mix
    assert bench.fuzz(c, 30, 3, spec, chunk=30, kinds=base) == {
        "records": 30,
        "crashes": 0,
        "lost": 0,
        "silent_corruption": 0,
    }
    assert not (tmp_path / "fuzz").exists()

    # A converter that drops one valid record: counted as lost, not passed.
    dropped = next(f.record["id"] for f in drawn if f.expect == faults.VALID)
    real = convert.Converter.prepare

    def drops(self, rid, rec):
        if isinstance(rec, dict) and rec.get("id") == dropped:
            raise convert.Skip("malformed", "dropped by the test")
        return real(self, rid, rec)

    monkeypatch.setattr(convert.Converter, "prepare", drops)
    assert bench.fuzz(c, 30, 3, spec, chunk=30, kinds=base)["lost"] == 1


def test_converter_escapes_are_refused(tiny_models, stage2_shards, tmp_path, capsys, load_benchmark):
    bench = load_benchmark("faults")
    assert bench.converter_escapes(bench.Campaign(tmp_path, 0, tiny_models, stage2_shards)) == 0
    out = capsys.readouterr().out
    assert out.count("FAILED") == 0 and out.count("skipped ({'outside_images_root': 3})") == 3


@pytest.mark.slow
def test_kill_between_rename_and_latest_resumes_exactly(
    tiny_models, stage2_shards, tmp_path, capsys, monkeypatch, load_benchmark
):
    """One rank, 4 steps: the reference run, then SIGKILL after step 2's checkpoint folder is renamed and before
    `latest` names it; the resume must start from step 2 (the newest complete checkpoint) and match bit for bit."""
    bench = load_benchmark("faults")
    monkeypatch.setattr(bench, "STEPS", 4)
    monkeypatch.setattr(bench, "SAVE_KILLS", [("renamed", False, (2,))])
    c = bench.Campaign(tmp_path, 0, tiny_models, stage2_shards, ranks=1)
    c.reference()
    assert bench.kill_during_save(c, 0)
    assert "SIGKILL at the renamed of step 2's synchronous save, resumed at step 2, exact" in capsys.readouterr().out


# ---------------------------------------------------------------- the payload, tamper and fuzz-family machinery


def test_judge_classifies_by_exit_and_the_files_name(load_benchmark):
    """Fake entry points: one that reads the file and says nothing, one that refuses naming it, one with a bare
    error, one that recovers. The verdict depends on the exit and the file's name only, not on the wording."""
    from devtools import faults
    from fastross.checkpoint import CheckpointError

    bench = load_benchmark("faults")

    def refuses():
        raise CheckpointError("/run/checkpoints/step_00000004/trainer.json: refused, not what fastross writes")

    def bare():
        raise UnicodeDecodeError("utf-8", b"\x80", 0, 1, "invalid start byte")

    def dcp_wrapped():  # DCP's CheckpointException derives from BaseException, not Exception
        from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

        try:
            raise ValueError("/run/checkpoints/step_00000004/trainer.json: refused")
        except ValueError as e:
            raise CheckpointException("load", {0: _wrap_exception(e)}) from None

    verdicts = {}
    for name, fn, same in (
        ("refuses", refuses, True),
        ("bare", bare, True),
        ("dcp", dcp_wrapped, True),
        ("exit2", lambda: 2, True),
        ("silent", lambda: 0, False),
        ("recovered", lambda: 0, True),
    ):
        rc, said = bench.in_process(fn)
        verdicts[name] = faults.judge(rc, said, ["trainer.json"], lambda same=same: same)
    assert verdicts == {
        "refuses": faults.CAUGHT,
        "bare": faults.UNNAMED,
        "dcp": faults.CAUGHT,
        "exit2": faults.UNNAMED,
        "silent": faults.SILENT,
        "recovered": faults.RECOVERED,
    }
    rc, said = bench.in_process(lambda: print("hello") or 0)
    assert (rc, said) == (0, "hello\n")


def test_payload_runs_under_pickle_and_not_under_weights_only(tmp_path):
    import io
    import pickle

    import torch

    from devtools import faults

    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"lr": faults.Returns(marker, "0.25")}, buf)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert not marker.exists()
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=False) == {"lr": 0.25}  # what DCP's planner does
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", ["param_group", "model", "extra_model"])
def test_planted_bytes_item_passes_the_metadata_check_and_runs_under_dcps_own_reader(tmp_path, kind):
    """The planted checkpoint verifies and its `.metadata` holds only DCP's classes; DCP's own reader and planner
    (torch.load(weights_only=False) for bytes items) run the payload: the campaign's trial can see a code run."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from devtools import faults
    from fastross import checkpoint
    from test_checkpoint import tiny_trained

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, opt = tiny_trained(0)
        ck = checkpoint.Checkpointer(tmp_path / "run", rank=0, keep=2)
        ck.save(1, model, opt, {"step": 1}, "x: 1\n")
        ckpt, marker = ck.latest(), tmp_path / "ran"
        key = faults.plant_bytes_item(ckpt, marker, kind)
        assert (
            checkpoint.verify(ckpt) is None and key in checkpoint.read_metadata(ckpt / ".metadata").state_dict_metadata
        )
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        if kind == "extra_model":
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

            _load_state_dict_from_keys({"model"}, storage_reader=dcp.FileSystemReader(str(ckpt)))
        else:
            want = dict(msd)
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(ckpt)))
            if kind == "model":  # the payload handed back the tensor it replaced
                assert torch.equal(state["model"][key.removeprefix("model.")], want[key.removeprefix("model.")])
        assert marker.read_text() == "pwned"
    finally:
        dist.destroy_process_group()


def test_fuzz_families_are_what_they_claim(tmp_path):
    """JSON families: a deep record is past json's recursion limit, a lone surrogate id parses but cannot be written
    as UTF-8, duplicate keys parse to the recorded (last-wins) record, every text is one line. Exotic formats: each
    one's file is of its format, and a VALID one's first frame gives its pixels through fastross's own decoder."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from devtools import faults
    from fastross.data.images import to_rgb8

    drawn = [
        faults._json_family(__import__("random").Random(s), f"f{s}", k) for s in range(40) for k in faults.JSON_FAMILIES
    ]
    seen = set()
    for f in drawn:
        text = f.text()
        assert "\n" not in text and "\u2028" not in text
        seen.add(f.kind)
        if f.kind.startswith("deep_nesting"):
            with pytest.raises(RecursionError):
                json.loads(text)
            continue
        parsed = json.loads(text)
        assert parsed == f.record
        if f.kind == "lone_surrogate:id":
            with pytest.raises(UnicodeEncodeError):
                parsed["id"].encode("utf-8")
        if f.kind == "duplicate_keys":
            assert text.count('"conversations"') == 2 or text.count('"id"') == 2
        if f.kind.startswith("wrong_types"):
            assert f.expect == faults.INVALID
    assert {
        "lone_surrogate:id",
        "lone_surrogate:value",
        "deep_nesting:conversations",
        "deep_nesting:value",
        "duplicate_keys",
        "wrong_types:from",
        "wrong_types:turn",
        "wrong_types:id",
    } <= seen

    formats = {
        "EPS": None,
        "PDF": None,
        "SVG": None,
        "ICO": "ICO",
        "GIF_animated": "GIF",
        "WEBP_animated": "WEBP",
        "APNG": "PNG",
        "TIFF16": "TIFF",
        "TIFF_float": "TIFF",
    }
    assert formats.keys() == faults.EXOTIC.keys()
    for fmt, pil in formats.items():
        data, rgb, expect = faults.make_exotic(fmt, 9, 14, 3)
        if fmt == "EPS":
            assert data.startswith(b"%!PS-Adobe")
        elif fmt == "PDF":
            assert data.startswith(b"%PDF")
        elif fmt == "SVG":
            assert b"<svg" in data
        else:
            img = Image.open(io.BytesIO(data))
            assert img.format == pil
            if fmt in ("GIF_animated", "WEBP_animated", "APNG"):
                assert img.n_frames == 3
        assert (expect == faults.VALID) == (rgb is not None)
        if rgb is not None:
            assert np.array_equal(np.asarray(to_rgb8(Image.open(io.BytesIO(data)))), rgb), fmt
        assert expect == {
            "EPS": faults.INVALID,
            "PDF": faults.INVALID,
            "SVG": faults.INVALID,
            "ICO": faults.INVALID,
            "TIFF_float": faults.EITHER,
        }.get(fmt, faults.VALID)


def test_tamper_cases_cover_every_file(tmp_path, load_benchmark):
    """Every file of a data set folder gets a flip and an edit, each of which changes the file; the checkpoint cases
    name every file fastross writes into a step, and `latest`."""
    import json

    import numpy as np

    bench = load_benchmark("faults")
    d = tmp_path / "data"
    d.mkdir()
    (d / "fastross.json").write_text(json.dumps({"latent_scale": 0.3611, "template": "x"}))
    (d / "index.json").write_text(json.dumps({"shards": [{"samples": 3}]}))
    np.save(d / "lengths.npy", np.array([72, 79, 86], np.int32))
    (d / "manifest.json").write_text(json.dumps({"sha256": {"fastross.json": "ab" * 32}}))
    cases = bench.dataset_tamper_cases(d, seed=1)
    assert sorted({f for f, _, _ in cases}) == ["fastross.json", "index.json", "lengths.npy", "manifest.json"]
    assert sorted(h for _, h, _ in cases) == ["edited"] * 4 + ["flipped"] * 4
    for name, how, tamper in cases:
        before = (d / name).read_bytes()
        tamper(d)
        assert (d / name).read_bytes() != before, (name, how)
        (d / name).write_bytes(before)
    assert json.loads((d / "fastross.json").read_text())["latent_scale"] == 0.3611
    names = {f for f, _, _ in bench.checkpoint_tamper_cases(0)}
    assert names == {
        ".metadata",
        "__0_0.distcp",
        "trainer.json",
        "rng_rank0.pt",
        "config.yaml",
        "manifest.json",
        "latest",
    }


def test_final_line_format(load_benchmark):
    import re

    bench = load_benchmark("faults")
    line = bench.final_line(
        resume_exact=(10, 10),
        save_kill_ok=(9, 10),
        fuzz={"records": 1000, "crashes": 0, "lost": 0, "silent_corruption": 0},
        escapes=0,
        disk_full_ok=(3, 3),
        corrupt_ckpt_ok=(5, 5),
        pickle_executed=(0, 24),
        tamper_caught=(22, 22),
    )
    assert line == (
        "faults: resume_exact 10/10 save_kill_ok 9/10 fuzz_records 1000 crashes 0 lost 0 "
        "silent_corruption 0 escapes 0 disk_full_ok 3/3 corrupt_ckpt_ok 5/5 pickle_executed 0/24 "
        "tamper_caught 22/22"
    )
    assert re.fullmatch(
        r"faults: resume_exact \d+/\d+ save_kill_ok \d+/\d+ fuzz_records \d+ crashes \d+ lost \d+ "
        r"silent_corruption \d+ escapes \d+ disk_full_ok \d+/\d+ corrupt_ckpt_ok \d+/\d+ "
        r"pickle_executed \d+/\d+ tamper_caught \d+/\d+",
        line,
    )
    assert len(bench.PAYLOAD_TRIALS) >= 12 and {e for e, _ in bench.PAYLOAD_TRIALS} == {
        "resume",
        "init_from",
        "export",
        "generate",
        "eval",
        "reference",
    }


@pytest.mark.slow
def test_one_payload_and_one_tamper_trial_end_to_end(tiny_models, stage2_shards, tmp_path, capsys, load_benchmark):
    """The 1-rank base run, then resume x .metadata (refused, today and after: the payload must not run) and a
    checkpoint's manifest.json edited (the resume falls back to step 2 and ends exactly as the base run)."""
    bench = load_benchmark("faults")
    c = bench.Campaign(tmp_path, 0, tiny_models, stage2_shards, ranks=1)
    s = bench.Small(c)
    assert bench.payload_trial(s, 0, "resume", "metadata") is False
    assert not (tmp_path / "marker_payload0").exists()
    cases = bench.checkpoint_tamper_cases(0)
    manifest_edit = [case for case in cases if case[:2] == ("manifest.json", "edited")]
    bench_cases = bench.checkpoint_tamper_cases
    try:
        bench.checkpoint_tamper_cases = lambda seed: manifest_edit
        assert bench.tamper_trials(s, 0, limit=1) == (1, 1)
    finally:
        bench.checkpoint_tamper_cases = bench_cases
    out = capsys.readouterr().out
    assert "pickle 0: ok: resume x metadata: refused naming the file, no code ran" in out
    assert "tamper 0: ok: checkpoint manifest.json edited: recovered, identical to the untampered run" in out
