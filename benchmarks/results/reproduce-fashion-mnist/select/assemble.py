"""Assemble reproduce select's results from its log (validation rows) and the ablation run (test rows)."""
import json, re, sys, hashlib
from pathlib import Path
import torch
torch.set_num_threads(1)
from idefender_gpu.data import load_dataset
from idefender_gpu.experiments.selection import (CANDIDATES, DEFAULT, RULE, SHRINKAGE, SelectConfig, _label, _pick,
                                                 _test_rows, _validation_split, _variant_json, markdown)
from idefender_gpu.experiments.blackbox import DetectorVariant
from idefender_gpu.experiments.report import _clean
from idefender_gpu.models import load_or_train, evaluate
log = Path("/tmp/h5/sel.log").read_text()
abl = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
labels = {_label(_variant_json(v)): v for v in CANDIDATES}
rows = []
for m in re.finditer(r"select: (.*), F (\d+) epochs: validation AUC \[([^\]]*)\], natural rejected ([0-9.]+): ([0-9.]+) s", log):
    v = labels[m.group(1)]
    auc = [float(a) for a in m.group(3).split(",")]
    rows.append({**_variant_json(v), "epochs": int(m.group(2)), "fit_seconds": None, "fit_and_score_seconds": float(m.group(5)),
                 "auc": auc, "natural_val_rejected_id95_train": float(m.group(4)), "mean_auc": sum(auc) / len(auc)})
assert len(rows) == len(CANDIDATES), len(rows)
chosen = _pick(rows)
cfg = SelectConfig(device="cpu")
data = load_dataset("fashion-mnist", "/usr/share/datasets/fashion-mnist")
split, x_val, y_val = _validation_split(data, cfg.n_validation)
F, info = load_or_train("F", split, seed=1, epochs=5, device="cpu")
assert info["cached"]
acc = float((evaluate(F, x_val) == y_val).double().mean())
start = re.search(r"load average \(1/5/15 min\)", log)
up = Path("/tmp/h5/sel.uptime").read_text().split("load average:")
results = {"experiment": "select", "dataset": "fashion-mnist", "seed": 0, "config": cfg.to_json(), "rule": RULE,
           "data": {"source": abl["data"]["source"], "sha256": abl["data"]["sha256"], "n_fit": int(split.x_train.shape[0]),
                    "n_validation": int(x_val.shape[0])},
           "models": {"5": {"F_validation_accuracy": acc, "F_cached": True, "E_cached": True}},
           "validation": rows, "chosen": chosen,
           "machine": {**abl["machine"], "load_average_start": [float(v) for v in up[1].split(",")],
                       "load_average": [float(v) for v in up[2].split(",")] if len(up) > 2 else None},
           "timings": {"total": float(sys.argv[3])},
           "assembled": "validation rows from the run's log (its process was stopped in the test phase at the "
                        "deadline); test rows from the ablation run (benchmarks/results/reproduce-fashion-mnist/ablation: "
                        "the same run_blackbox configuration, seeds and checkpoints as the test phase)"}
cv = DetectorVariant(tuple(chosen["layers"]), chosen["n_components"], chosen["covariance_type"], chosen["reg_covar"],
                     chosen["max_iter"], chosen["covariance_estimator"])
keep = {DEFAULT, cv, *SHRINKAGE}
test = {**abl, "ablation": {**abl["ablation"], "rows": [r for r in abl["ablation"]["rows"] if DetectorVariant(
    tuple(r["layers"]), r["n_components"], r["covariance_type"], r["reg_covar"], r["max_iter"],
    r.get("covariance_estimator", "empirical")) in keep]}}
results["test"] = test
results["test_rows"] = _test_rows(test, cv)
md = markdown(results).replace("Full test report: [test/report.md](test/report.md).",
                               "Full test report: [../ablation/report.md](../ablation/report.md) (these rows are its "
                               "ablation rows: the same run_blackbox configuration, seeds and checkpoints as this "
                               "command's test phase, which was stopped at the deadline on the shared machine).")
(out / "report.md").write_text(md)
data_out = {k: v for k, v in results.items() if k != "test"}
(out / "results.json").write_text(json.dumps(_clean(data_out), indent=2) + "\n")
print(md)
