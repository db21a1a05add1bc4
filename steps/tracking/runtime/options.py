"""Every click option the entry points share, declared once.

MLproject stays the single source of truth for names, types and defaults
(``tests/test_mlproject.py`` checks each script against it, and ``TrainConfig`` against
these); this module is the one place the scripts take their options from. Each name is a
factory: ``@options.EPOCHS()``, or ``@options.EPOCHS(default=3)`` where an entry point's
MLproject default differs.
"""

from __future__ import annotations

import os
import re

import click

from steps.core.choices import (
    ARCHS,
    AUGMENTS,
    DATASETS,
    DEVICES,
    LR_SCHEDULES,
    METRICS,
    OPTIMIZERS,
    SEED_MAX,
    parse_hidden,
    training_bytes,
)
from steps.tracking.runtime.tags import DEFAULT_ALIAS

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def _option(*decls: str, **attrs):
    def factory(**overrides):
        return click.option(*decls, **{"show_default": True, **attrs, **overrides})
    return factory


def _check_hidden(_ctx, _param, value: str) -> str:
    try:
        parse_hidden(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _check_model_name(_ctx, _param, value: str) -> str:
    if not MODEL_NAME_RE.match(value):
        raise click.BadParameter(
            f"{value!r} is not a valid model name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (at most 128 characters)")
    return value


def _check_alias(_ctx, _param, value: str) -> str:
    if not ALIAS_RE.match(value) or value.lower() == "latest":
        raise click.BadParameter(f"{value!r}: use letters, digits, '_' or '-' (and not 'latest')")
    return value


DATASET = _option("--dataset", type=click.Choice(DATASETS), default="mnist",
                  help="Which dataset; 'digits' ships with scikit-learn and works offline.")
DATA_DIR = _option("--data-dir", default="",
                   help="Folder holding the four IDX files (skips the download).")
DATA = _option("--data", default="",
               help="Data artifact URI, runs:/<id>/data (empty = newest download_data run).")
EPOCHS = _option("--epochs", type=click.IntRange(min=1), default=5)
LEARNING_RATE = _option("--learning-rate", type=click.FloatRange(min=0, min_open=True),
                        default=0.003, help="The peak rate under lr_schedule=onecycle.")
BATCH_SIZE = _option("--batch-size", type=click.IntRange(min=1), default=64)
OPTIMIZER = _option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam")
ARCH = _option("--arch", type=click.Choice(ARCHS), default="cnn",
               help="cnn: two conv blocks, the default; mlp: the quickest smoke runs.")
HIDDEN = _option("--hidden", default="", callback=_check_hidden,
                 help="Two hidden sizes (mlp) or channel counts (cnn), e.g. '256,128'.")
LR_SCHEDULE = _option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="onecycle",
                      help="onecycle: warm up to learning_rate, then anneal; constant: none.")
AUGMENT = _option("--augment", type=click.Choice(AUGMENTS), default="shift",
                  help="shift: move each training image up to 2 pixels each way; none: off.")
SEED = _option("--seed", type=click.IntRange(0, SEED_MAX), default=42)
VAL_FRACTION = _option("--val-fraction",
                       type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1)
PATIENCE = _option("--patience", type=click.IntRange(min=0), default=0,
                   help="Stop after this many epochs without a better val_accuracy (0 = off).")
CHECKPOINT_EVERY = _option("--checkpoint-every", type=click.IntRange(min=0), default=1,
                           help="Save a checkpoint with the run every this many epochs, and "
                                "at the last (0 = off).")
DEVICE = _option("--device", type=click.Choice(DEVICES), default="auto")
WORKERS = _option("--workers", type=click.IntRange(min=1), default=1,
                  help="Data-parallel processes on this machine (one per GPU on CUDA); "
                       "batch_size stays the global batch.")
NODES = _option("--nodes", type=click.IntRange(min=1), default=1,
                help="Machines in the job (each runs --workers processes).")
NODE_RANK = _option("--node-rank", type=click.IntRange(min=0), default=0,
                    help="This machine's place in the job; node 0 owns the MLflow run.")
MAX_RESTARTS = _option("--max-restarts", type=click.IntRange(min=0), default=0,
                       help="Restart every rank this many times at most after one fails; "
                            "they continue from the latest checkpoint (torch elastic).")
RDZV_ENDPOINT = _option("--rdzv-endpoint", default="",
                        help="host:port of node 0's rendezvous (nodes > 1 only).")
MODEL_NAME = _option("--model-name", default="mnist-classifier", callback=_check_model_name,
                     help="Registered model name.")
MODEL_URI = _option("--model-uri", default="", help="A logged or registered model's URI.")
ALIAS = _option("--alias", default=DEFAULT_ALIAS, callback=_check_alias,
                help="Alias that follows the best version.")
METRIC = _option("--metric", type=click.Choice(METRICS), default="test_accuracy",
                 help="What 'better' means (test_loss: lower is better).")


def _check_min_score(_ctx, _param, value: str) -> float | None:
    if value == "":
        return None
    try:
        score = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (or empty for none)") from None
    if not score == score or score in (float("inf"), float("-inf")):
        raise click.BadParameter(f"{value!r} is not a finite number")
    return score


MIN_DELTA = _option("--min-delta", type=click.FloatRange(min=0), default=0.0,
                    help="The alias moves only to a version that beats the holder by at "
                         "least this much on METRIC (0 = by anything).")
MIN_SCORE = _option("--min-score", default="", callback=_check_min_score,
                    help="The alias moves only to a version that reaches this METRIC (a "
                         "ceiling for test_loss; empty = none).")

def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_model_fits(arch: str, hidden: str, batch_size: int) -> None:
    """Refuse, naming ``hidden``, a network that cannot train in this machine's memory,
    before anything is allocated or downloaded."""
    needed, have = training_bytes(arch, parse_hidden(hidden), batch_size), physical_memory()
    if needed > have:
        raise click.BadParameter(
            f"{hidden!r}: training this {arch} needs at least {needed / 2**30:.1f} GiB "
            f"(weights, gradients, optimiser state, one batch of {batch_size}); this machine "
            f"has {have / 2**30:.1f} GiB", param_hint="hidden")


# The hyperparameters main passes on to train, in MLproject's order.
TRAINING = (EPOCHS, LEARNING_RATE, BATCH_SIZE, OPTIMIZER, ARCH, HIDDEN, LR_SCHEDULE, AUGMENT,
            SEED, PATIENCE)


def training_options(func):
    """Apply the shared training hyperparameters (``main`` and ``train``)."""
    for option in reversed(TRAINING):
        func = option()(func)
    return func
