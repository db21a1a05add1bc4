"""What counts as a batch of digit images, for every way images come in: ``predict``'s files,
the served model's requests, Spark's rows.

Shipped inside every logged classifier beside ``model.py`` (it runs in ``mlflow models
serve``, where this project is not importable), so it needs numpy and pandas only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LAYOUTS = "(N, 28, 28), (N, 1, 28, 28) or (N, 784)"


def to_images(model_input) -> np.ndarray:
    """Any accepted input -> float32 (N, 28, 28) with pixels 0-255, or ValueError saying
    what is wrong (a message fit to follow ``images: ``).

    Accepted: uint8 or float pixels 0-255 in the layouts above, as a numpy array, a nested
    list, a DataFrame of 784 pixel columns, or a DataFrame whose one column holds an array
    per image (what Spark hands a model for an ``array<float>`` column).
    """
    if isinstance(model_input, pd.DataFrame) and _header_is_data(model_input.columns):
        raise ValueError(
            "the CSV has no header line: its first row of pixels was read as the column "
            "names. A CSV's first line names the columns (784 of them, e.g. p0,...,p783); "
            "add one, or send JSON")
    if isinstance(model_input, pd.DataFrame) and model_input.shape[1] == 1 and \
            model_input.dtypes.iloc[0].kind == "O":
        model_input = model_input.iloc[:, 0].to_numpy()
    elif isinstance(model_input, dict) and len(model_input) == 1:
        model_input = next(iter(model_input.values()))
    try:
        if isinstance(model_input, pd.DataFrame):
            array = model_input.to_numpy()
        elif isinstance(model_input, np.ndarray) and model_input.dtype.kind == "O":
            array = np.stack([np.asarray(row, dtype=np.float64) for row in model_input]) \
                if len(model_input) else np.empty((0, 784))
        else:
            array = np.asarray(model_input)
    except (TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"pixels must be numbers in images of one shape ({first})") from None
    if array.dtype == object or not np.issubdtype(array.dtype, np.number) or \
            np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"pixels must be numbers, got {_kind(array)}")
    if array.ndim == 0:
        raise ValueError(f"got a single number, not images of shape {LAYOUTS}")
    if len(array) == 0:
        raise ValueError("there are no images (an empty batch)")
    if array.ndim == 2 and array.shape[1] == 784:
        array = array.reshape(-1, 28, 28)
    elif array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ValueError(f"each image must be 28x28 pixels, a batch shaped {LAYOUTS}; "
                         f"got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"{bad} pixel values are not finite numbers (NaN or infinity); "
                             "pixels are numbers from 0 to 255")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise ValueError(f"pixels must be from 0 to 255; these range from {low:g} to {high:g}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _header_is_data(columns) -> bool:
    """Whether a frame's column names are a row of pixel values (a CSV read without its
    header line): all numbers, and not the distinct integers a header of pixel indices
    would be. 784 values from 0 to 255 always repeat, and pandas renames a repeated name
    ``0`` to ``0.1``, ``0.2``, ..."""
    try:
        values = [float(str(c)) for c in columns]
    except ValueError:
        return False
    integers = all(v.is_integer() for v in values)
    return bool(values) and not (integers and len(set(values)) == len(values))


def _kind(array: np.ndarray) -> str:
    if array.dtype == object:
        return "mixed or nested values (dtype object)"
    if array.dtype.kind in "US":
        return f"text (dtype {array.dtype})"
    return f"dtype {array.dtype}"
