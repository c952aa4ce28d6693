"""report.md and the plots of a study, from whatever results exist in its results_dir."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis.plots import pyplot, save_figure
from ..schema import flatten
from .plan import Job, Plan, fmt_value, short_key

# Axes the report plots as ablations when the study varies them (label, file name).
ABLATION_AXES = {"lisa.n_layers": ("γ", "γ: blocks active at a time (lisa.n_layers)", "ablation_gamma.png"),
                 "lisa.interval": ("K", "K: steps between switches (lisa.interval)", "ablation_interval.png")}


# -- the report ----------------------------------------------------------------------------------------
@dataclass
class Result:
    job: Job
    summary: dict
    info: dict
    rows: list[dict]

    @property
    def median_step_s(self) -> float | None:
        steps = [r["step_s"] for r in self.rows if "step_s" in r]
        return statistics.median(steps) if steps else None

    def curve(self, key: str = "eval_loss") -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.rows if key in r]

    def lowest(self, key: str = "eval_loss") -> tuple[int, float] | None:
        """The best evaluation during training (step > 0): what keeping the best checkpoint would give."""
        points = [(v, s) for s, v in self.curve(key) if s > 0 and isinstance(v, (int, float))]
        return min(points)[::-1] if points else None


def load_results(plan: Plan) -> tuple[dict[str, Result], dict[str, dict]]:
    results, failed = {}, {}
    for job in plan.jobs:
        rdir = plan.results_dir / job.run_id
        if (rdir / "summary.json").is_file():
            rows = []
            if (rdir / "metrics.jsonl").is_file():
                rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            info = json.loads((rdir / "run.json").read_text()) if (rdir / "run.json").is_file() else {}
            results[job.run_id] = Result(job, json.loads((rdir / "summary.json").read_text()), info, rows)
        elif (rdir / "failed.json").is_file():
            failed[job.run_id] = json.loads((rdir / "failed.json").read_text())
    return results, failed


def _stat(values: list[float | None], fmt: str = "{:.4f}") -> str:
    vs = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vs:
        return "–"
    if len(vs) == 1:
        return fmt.format(vs[0])
    return f"{fmt.format(statistics.mean(vs))} ± {fmt.format(statistics.stdev(vs))}"


def _lowest(results: list[Result]) -> str:
    """Mean lowest eval loss over seeds, with the step(s) where each run reached it."""
    lows = [r.lowest() for r in results]
    lows = [x for x in lows if x]
    return f"{_stat([v for _, v in lows])} @{','.join(str(s) for s, _ in lows)}" if lows else "–"


def _mean(values) -> float | None:
    vs = [v for v in values if isinstance(v, (int, float))]
    return statistics.mean(vs) if vs else None


@dataclass
class Group:
    """The runs of one setting at one sweep point (its seeds)."""
    setting: str
    sweep: dict
    results: list[Result]
    jobs: list[Job]  # the `seeds` runs
    extra: list[Job] = field(default_factory=list)  # the best_seeds runs (train only at the best point)

    def planned(self, is_best: bool) -> int:
        """How many runs this point trains: its `seeds`, plus its best_seeds if it is the setting's best."""
        return len(self.jobs) + (len(self.extra) if is_best else 0)

    def after(self, key: str, base_only: bool = False) -> float | None:
        return _mean(r.summary["after"].get(key) for r in self.results if not (base_only and r.job.if_best))


def _groups(plan: Plan, results: dict[str, Result]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = {}
    for setting in plan.settings:
        by_point: dict[str, Group] = {}
        for job in (j for j in plan.jobs if j.setting == setting):
            key = json.dumps(job.sweep, sort_keys=True)
            g = by_point.setdefault(key, Group(setting, job.sweep, [], []))
            (g.extra if job.if_best else g.jobs).append(job)
            if job.run_id in results:
                g.results.append(results[job.run_id])
        out[setting] = sorted(by_point.values(), key=lambda g: tuple(
            (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)) for v in g.sweep.values()))
    return out


def _best(groups: list[Group], select: str) -> Group | None:
    """The sweep point with the lowest mean `select`, judged on the `seeds` runs only (best_seeds come after)."""
    done = [g for g in groups if g.after(select, base_only=True) is not None]
    return min(done, key=lambda g: g.after(select, base_only=True)) if done else None


def if_best_state(plan: Plan, job: Job, results: dict[str, Result], failed: dict) -> str | None:
    """For a best_seeds run: None if it should train now, else why not ('waits ...' or 'not the best ...')."""
    groups = _groups(plan, results)[job.setting]
    to_go = [j for g in groups for j in g.jobs if j.run_id not in results and j.run_id not in failed and not j.skip]
    if to_go:
        return f"waits for the sweep of {job.setting} ({len(to_go)} run(s) to go)"
    best = _best(groups, plan.study.select)
    if best is None or best.sweep != job.sweep:
        return f"not the best sweep point of {job.setting}"
    return None


def write_report(plan: Plan) -> Path:
    """results_dir/report.md and the plots, from whatever results exist."""
    res_dir = plan.results_dir
    res_dir.mkdir(parents=True, exist_ok=True)
    results, failed = load_results(plan)
    groups = _groups(plan, results)
    sel = plan.study.select
    best = {s: _best(gs, sel) for s, gs in groups.items()}
    text_data = any(j.config["data"]["format"] == "text" for j in plan.jobs)
    gsm_data = any(j.config["data"]["format"] == "gsm" for j in plan.jobs)
    swept = any(len(gs) > 1 or any(g.sweep for g in gs) for gs in groups.values())

    base = plan.jobs[0].config
    t, d = base["train"], base["data"]
    lines = [f"# Study `{plan.study.name}`", ""]
    if plan.study.description:
        lines += [plan.study.description.strip(), ""]
    n_done = len(results)
    n_planned = sum(len(g.jobs) for gs in groups.values() for g in gs) + sum(len(gs[0].extra) for gs in groups.values())
    lines += [f"Model `{base['model']['source']}`, data format `{d['format']}`"
              + (f" (`{d['path']}`)" if d.get("path") else "")
              + f", max_length {d['max_length']}, batch {t['batch_size']}×{t['grad_accum']}, "
              f"{t['max_steps'] or str(t['epochs']) + ' epochs'} steps, {t['schedule']} schedule, "
              f"warmup {t['warmup_steps']}. {n_done} of {n_planned} runs finished"
              + (f", {len(failed)} failed" if failed else "") + ".", ""]

    head = ["setting", "method"] + (["sweep (best)"] if swept else []) + ["seeds", "eval loss before",
                                                                           "eval loss after", "lowest eval loss"]
    if text_data:
        head += ["ppl before", "ppl after"]
    if gsm_data:
        head += ["GSM EM before", "GSM EM after"]
    head += ["peak RSS MiB", "median s/step", "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting in plan.settings:
        g = best[setting]
        job = plan.jobs[[j.setting for j in plan.jobs].index(setting)]
        if g is None:
            lines.append(f"| {setting} | {job.config['method']} | " + " | ".join(["–"] * (len(head) - 2)) + " |")
            continue
        rs = g.results
        row = [setting, rs[0].job.config["method"]]
        if swept:
            n_points = len(groups[setting])
            row.append(", ".join(f"{short_key(k)} {fmt_value(v)}" for k, v in g.sweep.items())
                       + (f" (of {n_points})" if n_points > 1 else ""))
        before = [r.summary["before"] or {} for r in rs]  # null when train.eval_before is false
        row += [f"{len(rs)}/{g.planned(is_best=True)}", _stat([b.get("eval_loss") for b in before]),
                _stat([r.summary["after"].get("eval_loss") for r in rs]), _lowest(rs)]
        if text_data:
            row += [_stat([b.get("eval_ppl") for b in before], "{:.2f}"),
                    _stat([r.summary["after"].get("eval_ppl") for r in rs], "{:.2f}")]
        if gsm_data:
            row += [_stat([b.get("gsm_exact_match") for b in before], "{:.3f}"),
                    _stat([r.summary["after"].get("gsm_exact_match") for r in rs], "{:.3f}")]
        row += [_stat([r.info.get("peak_rss_mib") for r in rs], "{:.0f}"),
                _stat([r.median_step_s for r in rs], "{:.2f}"),
                _stat([r.summary.get("train_seconds") for r in rs], "{:.0f}")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Values are mean ± sample standard deviation over seeds (one value: a single seed). "
              f"With a sweep, each setting is shown at the sweep point with the lowest mean `{sel}` after "
              "training" + (f" on seeds {plan.study.seeds} (then run again with seeds {plan.study.best_seeds})"
                            if plan.study.best_seeds else "") + ". Eval loss is on the held-out set"
              + (" (whole held-out GSM templates)" if gsm_data else "") + "; "
              "lowest eval loss is the best of the evaluations during training (`@` the step of each run), what "
              "keeping the best checkpoint would give; "
              "peak RSS is the high-water mark of the run's own process (model loading, evaluation and "
              "training)" + ("" if plan.study.isolate else " — here in-process (isolate: false), so it also "
                               "counts what earlier runs left allocated") +
              "; median s/step is over the logged `step_s` of metrics.jsonl.", ""]

    if swept:
        lines += ["## Sweeps", "", "| setting | sweep point | seeds | eval loss after | lowest eval loss |"
                  + (" GSM EM after |" if gsm_data else ""), "|---|---|---|---|---|" + ("---|" if gsm_data else "")]
        for setting in plan.settings:
            for g in groups[setting]:
                point = ", ".join(f"{short_key(k)} {fmt_value(v)}" for k, v in g.sweep.items()) or "–"
                mark = " **best**" if g is best[setting] and len(groups[setting]) > 1 else ""
                row = [setting, point + mark, f"{len(g.results)}/{g.planned(g is best[setting])}",
                       _stat([r.summary["after"].get("eval_loss") for r in g.results]), _lowest(g.results)]
                if gsm_data:
                    row.append(_stat([r.summary["after"].get("gsm_exact_match") for r in g.results], "{:.3f}"))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    plots = _plots(plan, groups, best, res_dir)
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({name})\n" for title, name in plots]
    skipped = [j for j in plan.jobs if j.skip and j.run_id not in results]
    if failed or skipped:
        lines += ["## Not in the table", ""]
        lines += [f"- `{rid}`: failed: {f.get('error', '')}" for rid, f in failed.items()]
        lines += [f"- `{j.run_id}`: skipped: {j.skip}" for j in skipped]
        lines.append("")
    lines += [f"Regenerate: `lisatune study {plan.path} --report-only`.", ""]
    path = res_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plots(plan: Plan, groups: dict[str, list[Group]], best: dict[str, Group | None], out: Path) -> list:
    plt = pyplot()
    made = []
    # Eval-loss curves: each setting at its best sweep point, mean over seeds.
    curves = {}
    for setting, g in best.items():
        if g is None:
            continue
        per_seed = [dict(r.curve()) for r in g.results]
        steps = sorted(set.intersection(*[set(c) for c in per_seed])) if per_seed else []
        if len(steps) >= 2:
            curves[setting] = (steps, [statistics.mean(c[s] for c in per_seed) for s in steps])
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for setting, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o", ms=3, label=setting)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out eval loss")
        ax.set_title(f"{plan.study.name}: eval loss (best sweep point, mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, out / "eval_loss.png")
        made.append(("eval loss curves", "eval_loss.png"))

    # Sweeps: final eval loss against the (single) sweep value, per setting.
    sweep_lines = {}
    for setting, gs in groups.items():
        pts = [(next(iter(g.sweep.values())), g.after(plan.study.select)) for g in gs
               if len(g.sweep) == 1 and g.results]
        pts = sorted((float(x), y) for x, y in pts if isinstance(x, (int, float)) and y is not None)
        if len(pts) >= 2:
            sweep_lines[setting] = pts
    if sweep_lines:
        key = next(iter(next(g for gs in groups.values() for g in gs if g.sweep).sweep))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for setting, pts in sweep_lines.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=setting)
        ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{plan.study.select} after training")
        ax.set_title(f"{plan.study.name}: sweep (mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, out / "sweep.png")
        made.append(("sweep", "sweep.png"))

    # Ablations (γ, K): settings that differ only in that option; one line per family of such settings.
    max_steps = plan.jobs[0].config["train"]["max_steps"]
    for axis, (symbol, label, name) in ABLATION_AXES.items():
        families = _ablation(plan, best, axis)
        if not families:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        xs_all = sorted({p[0] for _, pts in families for p in pts})
        for fam_label, pts in families:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=fam_label or None)
            for x, y, _, n in pts:
                ax.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ticks = [f"{x}" + ("\n(one switch)" if axis == "lisa.interval" and max_steps and x >= max_steps else "")
                 for x in xs_all]
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, ticks)
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel(f"{plan.study.select} after training")
        ax.set_title(f"{plan.study.name}: {symbol} ablation (mean ± sd over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        if any(f for f, _ in families):
            ax.legend(fontsize=7)
        save_figure(fig, out / name)
        made.append((f"{symbol} ablation", name))
    return made


_NOT_COMPARED = ("train.seed", "lisa.seed", "train.output_dir", "train.resume", "train.overwrite")


def _ablation(plan: Plan, best: dict[str, Group | None], axis: str) -> list[tuple[str, list]]:
    """Families of finished LISA settings that differ only in `axis`: [(label, [(value, mean, sd, n)])]."""
    flat = {}
    for setting, g in best.items():
        if g is None or g.results[0].job.config["method"] != "lisa":
            continue
        flat[setting] = {k: v for k, v in flatten(g.results[0].job.config).items()
                         if k not in _NOT_COMPARED and k not in plan.study.seed_keys and k not in g.sweep}
    if len(flat) < 2:
        return []
    keys = set().union(*flat.values())
    varied = {k for k in keys if len({json.dumps(f.get(k)) for f in flat.values()}) > 1}
    if axis not in varied:
        return []
    families: dict[str, list[str]] = {}
    for setting, f in flat.items():
        label = ", ".join(f"{short_key(k)}={f.get(k)}" for k in sorted(varied - {axis}))
        families.setdefault(label, []).append(setting)
    out = []
    for label, settings in families.items():
        if len({flat[s][axis] for s in settings}) < 2:
            continue
        pts = []
        for s in settings:
            vals = [r.summary["after"].get(plan.study.select) for r in best[s].results]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                pts.append((flat[s][axis], statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            len(vals)))
        out.append((label, sorted(pts)))
    return [("", out[0][1])] if len(out) == 1 else out


