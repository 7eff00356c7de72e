"""fastross.data.progress: plain lines, never a carriage return, when the stream is not a terminal; tqdm's bar on
one; and the converter's progress in a piped log."""

import io
import json
import re

from fastross.data import convert
from fastross.data.progress import Lines, progress

LINE = re.compile(r"^convert: (\d+)/25 rec \((\d+)%\), [\d.]+ rec/s, \d+ s(, eta \d+ s)?$")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_piped():
    out = io.StringIO()
    seen = list(progress(range(25), total=25, desc="convert", unit="rec", every=10, stream=out))
    assert seen == list(range(25))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [int(LINE.match(x).group(1)) for x in lines] == [10, 20, 25], lines
    assert [int(LINE.match(x).group(2)) for x in lines] == [40, 80, 100]
    assert "eta" not in lines[-1] and "eta" in lines[0]


def test_default_every_and_updates():
    out = io.StringIO()
    with progress(total=95, desc="plan", unit="step", stream=out) as bar:  # ten lines: every 10 steps
        assert isinstance(bar, Lines) and bar.every == 10
        for _ in range(19):
            bar.update(5)
    counts = [int(x.split()[1].split("/")[0]) for x in out.getvalue().splitlines()]
    assert counts == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]
    out = io.StringIO()
    list(progress(iter(range(2500)), desc="index", unit="sample", stream=out))  # no total: every 1000
    assert [x.split(",")[0] for x in out.getvalue().splitlines()] == [f"index: {n} sample" for n in (1000, 2000, 2500)]
    out = io.StringIO()
    assert list(progress(range(3), disable=True, stream=out)) == [0, 1, 2] and out.getvalue() == ""


def test_bar_on_a_terminal():
    tty = Terminal()
    list(progress(range(5), total=5, desc="convert", unit="rec", stream=tty))
    assert "\r" in tty.getvalue() and "5/5" in tty.getvalue()


def test_converter_writes_lines_to_a_log(tmp_path, tiny_models, synth_data, capsys):
    """The converter without --quiet, its stderr captured (not a terminal): plain lines, no carriage return."""
    records = json.loads((synth_data / "stage2.json").read_text())[:25]
    src = tmp_path / "s2.json"
    src.write_text(json.dumps(records))
    argv = [
        "--json",
        str(src),
        "--images",
        str(synth_data / "images"),
        "--tokenizer",
        str(tiny_models / "llm"),
        "--template",
        "qwen2_ross",
        "--vision",
        str(tiny_models / "vision"),
        "--out",
        str(tmp_path / "out"),
        "--progress-every",
        "10",
    ]
    assert convert.main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [x for x in err.splitlines() if x.startswith("convert: ")]
    assert [int(LINE.match(x).group(1)) for x in lines] == [10, 20, 25], err
