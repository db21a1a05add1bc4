"""The pure core: data, model, training loop, metrics and figures.

Nothing in here imports mlflow or click; the entry scripts in ``steps/`` do the tracking.
"""
