"""What the tests and benchmarks share, outside the installed package: fastross never imports it.

    faults          launching and killing torchrun runs, comparing runs bit for bit, corrupting files (fault tests,
                    benchmarks/faults.py)
    fault_train     `fastross.train` with one fault injected at a named moment of a save (benchmarks/faults.py)
    golden          the tiny recipe's golden losses (tests/golden/tiny_losses.json, tests/test_golden.py)
    make_slice      the 7B slice's folders (benchmarks/slice_train.py, benchmarks/throughput.py --slice)
    results         what a benchmark records with --save beside its figures: commit, machine, date
    tiny_tokenizers tiny Llama-family tokenizer folders for the template tests

The tests find it from the repo root (pyproject.toml's pytest `pythonpath`); the benchmarks put the repo root on
sys.path themselves. pyproject.toml's wheel.packages lists only fastross, so `pip install` leaves this folder out.
"""
