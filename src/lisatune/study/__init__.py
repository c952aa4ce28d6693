"""`lisatune study STUDY.yaml`: a grid of training runs, run one after another, resumable, with a report.

A study file names a base run config and the runs to compare:

    name: sft-smollm2
    base_config: ../examples/lora_gsm.yaml      # relative to the study file; `base:` (inline) is merged on top
    output_dir: runs/studies/sft-smollm2        # checkpoints and models: large, not committed
    results_dir: studies/results/sft-smollm2    # summary.json, metrics.jsonl, config.yaml per run: small, committed
    seeds: [0, 1, 2]                            # each seed sets train.seed and lisa.seed (see seed_keys)
    best_seeds: [3]                             # then at each setting's best sweep point only (chosen on seeds)
    sweep: {train.lr: [1.0e-5, 3.0e-5]}         # every setting is run at each value; the report keeps the best
    runs:                                       # named settings (dotted overrides, as `lisatune train --set`)
      - {name: full, set: {method: full}}
      - {name: lora-r8, set: {method: lora, lora.r: 8}, sweep: {train.lr: [3.0e-4, 1.0e-3]}}
    grid: {lisa.n_layers: [1, 2]}               # axes: their product (crossed with `runs` when both are given)

Every run gets the id SETTING[_SWEEPVALUES]_sSEED and trains in output_dir/ID with train.resume=auto. A run
with results_dir/ID/summary.json is done and skipped; an interrupted run resumes from its last checkpoint.
Each run trains in its own process (`isolate: true`), so its peak RSS (ru_maxrss of that process) is its own.
Paths in the study's own fields (output_dir, results_dir) and inside run configs are relative to the current
directory, like `lisatune train`; only base_config is relative to the study file.

Modules: plan (the study file -> jobs), runner (training them), report (table and plots).
"""
from __future__ import annotations

from .plan import Job, Plan, load_study
from .report import if_best_state, load_results, write_report
from .runner import run_study

__all__ = ["Job", "Plan", "load_study", "load_results", "run_study", "write_report", "register"]


# -- command line --------------------------------------------------------------------------------------
def cmd_study(args) -> int:
    plan = load_study(args.study)
    if args.report_only:
        print(f"report: {write_report(plan)}")
        return 0
    if args.dry_run:
        results, failed = load_results(plan)
        for j in plan.jobs:
            state = ("done" if j.run_id in results else "failed" if j.run_id in failed
                     else f"skip: {j.skip}" if j.skip
                     else (if_best_state(plan, j, results, failed) or "to run (best point)") if j.if_best
                     else "to run")
            print(f"{j.run_id}: {state}")
        return 0
    r = run_study(plan, retry_failed=args.retry_failed, only=args.only, echo=lambda m: print(m, flush=True))
    print(f"{r['trained']} trained, {r['done']} already done, {r['skipped']} skipped, {r['failed']} failed")
    if r.get("interrupted"):
        return 130
    return 1 if r["failed"] else 0  # a script (or CI) running a study sees that runs failed


def register(subparsers) -> None:
    s = subparsers.add_parser("study")  # (its line in `lisatune --help`: cli.COMMANDS)
    s.add_argument("study", help="study file (YAML): base config, runs/grid, seeds, sweep")
    s.add_argument("--report-only", action="store_true", help="only regenerate report.md and plots from results_dir")
    s.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    s.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    s.add_argument("--only", nargs="+", metavar="NAME", help="only these run ids or settings")
    s.set_defaults(func=cmd_study)
