"""The allowed values of the categorical parameters, in one torch-free place.

``main`` and ``register`` declare their options from here without importing torch.
"""

ARCHS = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")
DATASETS = ("mnist", "fashion-mnist", "kmnist", "digits")
