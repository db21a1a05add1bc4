"""The allowed values of the parameters, in one torch-free place.

``main`` and ``register`` declare their options from here without importing torch.
"""

ARCHS = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("onecycle", "constant")
AUGMENTS = ("shift", "none")  # shift: each training image moved by up to 2 pixels each way
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


# Per weight while training: float32 weights, gradients, Adam's two moments, and the copy
# of the best epoch's weights.
BYTES_PER_WEIGHT = 4 * 5


def network_weights(arch: str, hidden: tuple[int, int] | None) -> int:
    """How many weights ``steps.core.model.build_model(arch, hidden)`` has, without building
    it (that alone may not fit in memory)."""
    if arch == "mlp":
        h1, h2 = hidden or (256, 128)
        return 784 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    c1, c2 = hidden or (16, 32)
    return 9 * c1 + c1 + 9 * c1 * c2 + c2 + c2 * 49 * 64 + 64 + 64 * 10 + 10


def training_bytes(arch: str, hidden: tuple[int, int] | None, batch_size: int) -> int:
    """A lower bound of the memory training takes: weights and optimiser state, plus one
    batch's activations kept for the backward pass."""
    if arch == "mlp":
        h1, h2 = hidden or (256, 128)
        per_image = 784 + h1 + h2 + 10
    else:
        c1, c2 = hidden or (16, 32)
        per_image = 784 * (1 + 2 * c1) + 196 * (c1 + 2 * c2) + 49 * c2 + 64 + 10
    return BYTES_PER_WEIGHT * network_weights(arch, hidden) + 2 * 4 * per_image * batch_size
