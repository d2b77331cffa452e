"""Does a covariance temperature chosen after training improve a trained SSN's samples?

For each benchmark seed: the default job (`tfp-seg train --seed S`, or with `--extra` flags;
trained once in a fresh process, kept under `--runs-dir`), then in this process:

```none
t_val      tfp_seg.calibration.CovarianceTemperature().fit on the run's validation split,
           against its raters (what a user has), GED of --num-samples label maps per image
t_val_ex   the same on the validation split against its exact label distribution (the modes
           and their weights): what the raters' choice would be without their sampling noise
t_best     the same grid scored on the test split against the exact label distribution (the
           modes and their weights): the best any temperature could do, for reference
test GED   that test curve at t = 1, t_val and t_best: one draw per image shared by every
           temperature (common random numbers), so these differences are paired
report     evaluate_ambiguous on the test split (what `report.json` measures: its own draws,
           logits' arg max) of the model as trained (t = 1) and of ControlledSampler(model,
           t_val): GED, HM-IoU, diversity / the data's diversity (oracle_diversity)
```

The report's GED of one model varies by several thousandths between seeds of the draw
(16 samples per image), about as much as the temperatures differ: the paired test GED is the
comparison to read.

Run (about 6 minutes per seed on 2 CPU cores, most of it training):
    python benchmarks/study_sample_temperature.py [--seeds 0 1 2] [--extra "--epochs 12"]
        [--runs-dir benchmarks/results/temperature_runs]
        [--out benchmarks/results/sample_temperature.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import _common  # log settings before TensorFlow loads; publish()

DEFAULT_GRID = "0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.25,1.5,2.0"

COLUMNS = (
    ("seed", "seed", "d"),
    ("t_val", "t (val raters)", ".2f"),
    ("t_val_exact", "t (val exact)", ".2f"),
    ("t_best", "t (test exact)", ".2f"),
    ("paired_1", "test GED t=1", ".4f"),
    ("paired_t", "test GED t (val raters)", ".4f"),
    ("paired_best", "test GED t (test exact)", ".4f"),
    ("ged_1", "report GED t=1", ".4f"),
    ("ged_t", "report GED t", ".4f"),
    ("hm_iou_1", "HM-IoU t=1", ".3f"),
    ("hm_iou_t", "HM-IoU t", ".3f"),
    ("div_1", "div/data t=1", ".3f"),
    ("div_t", "div/data t", ".3f"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--extra", default="", help="extra `tfp-seg train` flags (one string)")
    p.add_argument("--temperatures", default=DEFAULT_GRID, help="the grid, comma-separated")
    p.add_argument("--num-samples", type=int, default=16, help="label maps per image")
    p.add_argument("--runs-dir", default="benchmarks/results/temperature_runs")
    p.add_argument("--out", default="benchmarks/results/sample_temperature.json")
    return p.parse_args(argv)


def train(seed: int, extra: str, runs_dir: str) -> str:
    """The run folder of the default job (with `extra`) at `seed`, trained if it is not there."""
    name = f"s{seed}" + ("-" + "_".join(extra.replace("--", "").split()) if extra else "")
    run_dir = os.path.join(runs_dir, name)
    if os.path.isfile(os.path.join(run_dir, "report.json")):
        return run_dir
    command = [
        sys.executable, "-m", "tfp_seg.cli", "train", *extra.split(), "--seed", str(seed),
        "--name", name, "--output-dir", runs_dir, "--no-export", "--quiet",
    ]  # fmt: skip
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    print(f"trained {run_dir} in {time.time() - start:.0f} s", flush=True)
    return run_dir


def study(run_dir: str, grid: tuple, num_samples: int) -> dict:
    from tfp_seg.calibration import ControlledSampler, CovarianceTemperature
    from tfp_seg.evaluation import evaluate_ambiguous
    from tfp_seg.runs.config import stored_config
    from tfp_seg.runs.data import make_data
    from tfp_seg.runs.evaluate import load_run

    config = stored_config(run_dir)
    if config is None:
        raise ValueError(f"{run_dir} has no config.json (not a tfp-seg run)")
    model = load_run(run_dir, config)
    _, val, test = make_data(config, run_dir)
    kwargs = dict(temperatures=grid, num_samples=num_samples, seed=config.seed)
    on_val = CovarianceTemperature(**kwargs).fit(model, val.images, val.annotations)
    on_val_exact = CovarianceTemperature(**kwargs).fit(
        model, val.images, val.modes, reference_weights=val.mode_weights
    )
    on_test = CovarianceTemperature(**kwargs).fit(
        model, test.images, test.modes, reference_weights=test.mode_weights
    )
    t = on_val.temperature
    before = evaluate_ambiguous(model, test, num_samples=num_samples, seed=config.seed)
    after = evaluate_ambiguous(
        ControlledSampler(model, temperature=t), test, num_samples=num_samples, seed=config.seed
    )
    return {
        "seed": config.seed,
        "run": run_dir,
        "t_val": t,
        "val_ged_1": on_val.ged_before,
        "val_ged_t": on_val.ged_after,
        "ged_1": before["ged"],
        "ged_t": after["ged"],
        "hm_iou_1": before["hm_iou"],
        "hm_iou_t": after["hm_iou"],
        "div_1": before["diversity"] / before["oracle_diversity"],
        "div_t": after["diversity"] / after["oracle_diversity"],
        "t_val_exact": on_val_exact.temperature,
        "t_best": on_test.temperature,
        "paired_1": on_test.ged_before,
        "paired_t": on_test.ged_by_temperature[t],
        "paired_best": on_test.ged_after,
        "oracle_ged": before["oracle_ged"],
        "val_curve": {str(k): v for k, v in on_val.ged_by_temperature.items()},
        "val_exact_curve": {str(k): v for k, v in on_val_exact.ged_by_temperature.items()},
        "test_curve": {str(k): v for k, v in on_test.ged_by_temperature.items()},
        # sample diversity over the data's (exact) diversity, the same paired draws
        "test_diversity_curve": {
            str(k): v["sample_diversity"] / v["reference_diversity"]
            for k, v in on_test.terms_by_temperature.items()
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    grid = tuple(float(t) for t in args.temperatures.split(","))
    os.makedirs(args.runs_dir, exist_ok=True)
    rows = []
    for seed in args.seeds:
        run_dir = train(seed, args.extra, args.runs_dir)
        row = study(run_dir, grid, args.num_samples)
        print(
            f"seed {seed}: t_val {row['t_val']:.2f}, test GED {row['ged_1']:.4f} -> "
            f"{row['ged_t']:.4f}; paired {row['paired_1']:.4f} -> {row['paired_t']:.4f} "
            f"(best t {row['t_best']:.2f}: {row['paired_best']:.4f})",
            flush=True,
        )
        rows.append(row)
    _common.publish(
        args,
        "Covariance temperature after training (CovarianceTemperature on validation raters)",
        rows,
        COLUMNS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
