"""The allowed values of the parameters, in one torch-free place.

``main`` and ``register`` declare their options from here without importing torch.
"""

ARCHS = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")
DATASETS = ("mnist", "fashion-mnist", "kmnist", "digits")
METRICS = ("test_accuracy", "test_macro_f1", "test_loss")
LOWER_IS_BETTER = ("test_loss",)  # every other metric: higher is better

# torch.manual_seed and NumPy's generators take seeds in [0, 2**32).
SEED_MAX = 2**32 - 1


def parse_hidden(text: str) -> tuple[int, int] | None:
    """'256,128' -> (256, 128); '' -> None (the architecture's default)."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"{text!r}: give two positive sizes like '256,128' (empty = the arch's default)"
        )
    return int(parts[0]), int(parts[1])
