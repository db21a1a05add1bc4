"""MNIST pipeline: one click script per MLflow entry point, over a pure core."""
