"""Real converted models for the ``models add`` tests: small, seeded, built once per test process.

A helper module (no tests). Each builder trains a tiny model on random data with the converter
users use (skl2onnx, onnxmltools, torch.onnx) and returns the ONNX bytes with the inputs it can be
fed (ONNX Runtime feeds, batch axis first). The converters come with the ``test`` extra; torch with
``train``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import warnings

import numpy as np

ROWS = 40
CITIES = ("oslo", "rome", "lima")
CLASSES = ("low", "mid", "high")


@dataclasses.dataclass(frozen=True)
class Converted:
    """ONNX bytes and ORT feeds of ``ROWS`` training rows."""

    onnx: bytes
    inputs: dict[str, np.ndarray]


@functools.cache
def sklearn_pipeline(zipmap: bool = True) -> Converted:
    """ColumnTransformer(OneHotEncoder on the string column "city", StandardScaler on "age" and
    "amount") -> LogisticRegression over 3 string classes, via skl2onnx with one input per column;
    ZipMap on (skl2onnx's default) or off (a label and a probabilities tensor)."""
    import pandas as pd
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "city": rng.choice(CITIES, ROWS),
            "age": rng.normal(40, 10, ROWS).astype(np.float32),
            "amount": rng.normal(0, 1, ROWS).astype(np.float32),
        }
    )
    target = np.array(CLASSES)[(frame["age"].to_numpy() > 40).astype(int) + (frame["amount"].to_numpy() > 0.5).astype(int)]
    pipeline = Pipeline(
        [
            ("columns", ColumnTransformer([("city", OneHotEncoder(handle_unknown="ignore"), ["city"]),
                                           ("numbers", StandardScaler(), ["age", "amount"])])),
            ("model", LogisticRegression()),
        ]
    ).fit(frame, target)
    model = convert_sklearn(
        pipeline,
        initial_types=[("city", StringTensorType([None, 1])), ("age", FloatTensorType([None, 1])),
                       ("amount", FloatTensorType([None, 1]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
        options={LogisticRegression: {"zipmap": zipmap}},
    )
    inputs = {
        "city": frame["city"].to_numpy(dtype=object).reshape(-1, 1),
        "age": frame["age"].to_numpy(np.float32).reshape(-1, 1),
        "amount": frame["amount"].to_numpy(np.float32).reshape(-1, 1),
    }
    return Converted(model.SerializeToString(), inputs)


@functools.cache
def xgboost_classifier() -> Converted:
    """XGBClassifier over 3 classes (labels 0, 1, 2), via onnxmltools: label + probabilities, no ZipMap."""
    import xgboost
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    rng = np.random.default_rng(2)
    rows = rng.normal(size=(ROWS, 4)).astype(np.float32)
    classes = (rows[:, 0] > 0).astype(int) + (rows[:, 1] > 0.5).astype(int)
    model = xgboost.XGBClassifier(n_estimators=4, max_depth=2, random_state=0).fit(rows, classes)
    onnx_model = convert_xgboost(model, initial_types=[("input", FloatTensorType([None, 4]))], target_opset=15)
    return Converted(onnx_model.SerializeToString(), {"input": rows})


@functools.cache
def lightgbm_regressor() -> Converted:
    """LGBMRegressor via onnxmltools: one float output [N, 1]."""
    import lightgbm
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    rng = np.random.default_rng(3)
    rows = rng.normal(size=(ROWS, 3)).astype(np.float32)
    model = lightgbm.LGBMRegressor(n_estimators=5, min_child_samples=2, random_state=0, verbose=-1)
    model.fit(rows, rows[:, 0] * 2 - rows[:, 2])
    onnx_model = convert_lightgbm(model, initial_types=[("input", FloatTensorType([None, 3]))], target_opset=15)
    return Converted(onnx_model.SerializeToString(), {"input": rows})


@functools.cache
def torch_two_outputs() -> Converted:
    """A torch.nn.Module with a scalar score [N, 1] and an embedding [N, 8], via torch.onnx (dynamo=False)."""
    import torch

    class ScoreAndEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = torch.nn.Linear(5, 8)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            embedding = torch.tanh(self.encode(x))
            return torch.sigmoid(self.head(embedding)), embedding

    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ScoreAndEmbedding().eval(),
            (torch.zeros(2, 5),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["score", "embedding"],
            dynamic_axes={"x": {0: "batch"}, "score": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
        )
    rows = np.random.default_rng(4).normal(size=(ROWS, 5)).astype(np.float32)
    return Converted(buffer.getvalue(), {"x": rows})
