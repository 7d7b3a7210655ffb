"""Writes breast_cancer.csv, the demo model's training data, from scikit-learn's copy of the
Wisconsin Diagnostic Breast Cancer data set (569 rows, 30 features, UCI ML repository).

Run once on a developer machine (``python models/training/make_breast_cancer.py``); the CSV is
committed, so training does not need scikit-learn. Column names are the data set's feature names
in snake_case; ``diagnosis`` is "malignant" or "benign" (scikit-learn's target 0 and 1).
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from sklearn.datasets import load_breast_cancer

OUT = Path(__file__).with_name("breast_cancer.csv")


def snake_case(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> int:
    data = load_breast_cancer()
    names = [snake_case(n) for n in data.feature_names]
    with OUT.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*names, "diagnosis"])
        for row, target in zip(data.data, data.target):
            writer.writerow([*(repr(float(v)) for v in row), data.target_names[target]])
    print(f"wrote {len(data.target)} rows, {len(names)} features to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
