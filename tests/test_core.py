"""Model, training loop, metrics and figures on tiny tensors."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from helpers.data import tiny_images
from steps.core import choices, metrics, model, plots, training


@pytest.mark.parametrize("arch", choices.ARCHS)
@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 1, 28, 28)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_models_take_raw_pixels_in_every_layout(arch, shape, dtype):
    net = model.build_model(arch)
    x = torch.randint(0, 256, shape).to(dtype)
    assert net(x).shape == (3, model.NUM_CLASSES)


def test_normalization_lives_in_the_model():
    x = torch.full((2, 28, 28), 255.0)
    normalized = model.Normalize()(x)
    assert torch.allclose(normalized, torch.full_like(normalized, (255 - model.PIXEL_MEAN)
                                                      / model.PIXEL_STD))


def test_probabilities_wrapper_sums_to_one():
    probs = model.Probabilities(model.build_model("mlp"))(torch.rand(4, 28, 28) * 255)
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-6)
    assert (probs >= 0).all()


@pytest.mark.parametrize("arch, hidden", [("mlp", None), ("mlp", (64, 32)), ("cnn", None),
                                          ("cnn", (8, 64))])
def test_the_weight_count_estimate_matches_the_built_network(arch, hidden):
    built = sum(p.numel() for p in model.build_model(arch, hidden).parameters())
    assert choices.network_weights(arch, hidden) == built
    assert choices.training_bytes(arch, hidden, 64) > choices.BYTES_PER_WEIGHT * built


def test_hidden_sizes_shape_the_network():
    net = model.build_model("mlp", (32, 16))
    assert [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)] == [32, 16, 10]
    with pytest.raises(ValueError, match="unknown arch"):
        model.build_model("resnet")


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs"), ("learning_rate", 0.0, "learning_rate"),
    ("learning_rate", -1.0, "learning_rate"), ("batch_size", 0, "batch_size"),
    ("optimizer", "rmsprop", "optimizer"), ("device", "tpu", "device"),
])
def test_train_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        training.TrainConfig(**{field: value})


def test_resolve_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"),
                                (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert training.resolve_device("auto").type == expected
    assert training.resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("device, message", [("cuda", "no CUDA GPU"),
                                             ("mps", "MPS is not available")])
def test_resolve_device_refuses_what_is_not_there(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        training.resolve_device(device)


@pytest.fixture(scope="module")
def tiny_split():
    """(images, labels, train indices, validation indices): a shuffled 500/100 split."""
    x, y = tiny_images(600, seed=3)
    order = np.random.default_rng(0).permutation(600)
    return x, y, order[:500], order[500:]


def test_train_learns_and_returns_the_best_epoch(tiny_split):
    seen = []
    config = training.TrainConfig(epochs=3, batch_size=32, seed=0, device="cpu")
    result = training.train(config, *tiny_split, on_epoch_end=seen.append)
    assert [e.epoch for e in seen] == [1, 2, 3]
    assert seen[-1].train_loss < seen[0].train_loss
    assert result.best_val_accuracy == max(e.val_accuracy for e in seen) > 0.5
    assert result.history[result.best_epoch - 1].val_accuracy == result.best_val_accuracy
    # The returned model really holds the best epoch's weights.
    x, y, _, val_idx = tiny_split
    x_val, y_val = training.to_device_tensors(x[val_idx], y[val_idx], torch.device("cpu"))
    _, acc = training.validate(result.model, x_val, y_val, torch.arange(len(y_val)))
    assert acc == pytest.approx(result.best_val_accuracy, abs=1e-6)
    assert not result.model.training


def test_progress_bars_only_when_asked(tiny_split, capsys, caplog):
    config = training.TrainConfig(epochs=2, batch_size=100, device="cpu")
    training.train(config, *tiny_split, progress=True)
    bars = capsys.readouterr().err
    assert "training" in bars and "2/2" in bars and "val_accuracy" in bars
    caplog.set_level("INFO")
    training.train(config, *tiny_split, progress=False)
    assert "\r" not in capsys.readouterr().err
    assert "epoch 2/2 train_loss=" in caplog.text


def test_train_is_reproducible_with_a_seed(tiny_split):
    config = training.TrainConfig(epochs=1, batch_size=64, seed=5, device="cpu", arch="cnn")
    first = training.train(config, *tiny_split).history[0]
    second = training.train(config, *tiny_split).history[0]
    assert first.train_loss == second.train_loss and first.val_accuracy == second.val_accuracy


def test_a_shift_moves_each_image_by_its_own_offset_and_fills_the_border_with_0():
    import torch

    images = torch.arange(2 * 28 * 28, dtype=torch.int64).reshape(2, 28, 28) % 251 + 1
    images = images.to(torch.uint8)
    moved = training.shift_images(images, torch.tensor([[2, -1], [0, 0]]))
    assert moved.dtype == torch.uint8 and moved.shape == images.shape
    assert torch.equal(moved[0, 2:, :27], images[0, :26, 1:])  # down 2, left 1
    assert not moved[0, :2].any() and not moved[0, :, 27].any()
    assert torch.equal(moved[1], images[1])


def test_the_schedule_and_the_shifts_are_part_of_training(tiny_split):
    """Each knob changes what is trained; each off is the plain loop of a constant rate on
    the images as they are."""
    config = training.TrainConfig(epochs=1, batch_size=64, seed=5, device="cpu", arch="mlp")
    losses = {knobs: training.train(dataclasses.replace(config, **dict(knobs)),
                                    *tiny_split).history[0].train_loss
              for knobs in ((), (("lr_schedule", "constant"),), (("augment", "none"),))}
    assert len(set(losses.values())) == 3, losses


def test_index_sets_train_exactly_like_copies_of_the_split(tiny_split):
    """Training on index sets into one array is the same computation as training on copies
    of the two splits (what the loop did before it stopped copying)."""
    x, y, train_idx, val_idx = tiny_split
    config = training.TrainConfig(epochs=2, batch_size=32, seed=1, device="cpu")
    by_index = training.train(config, x, y, train_idx, val_idx).history
    copies = np.concatenate([x[train_idx], x[val_idx]]), np.concatenate([y[train_idx],
                                                                            y[val_idx]])
    n = len(train_idx)
    by_copy = training.train(config, *copies, np.arange(n), np.arange(n, len(x))).history
    assert [(e.train_loss, e.val_loss, e.val_accuracy) for e in by_index] == [
        (e.train_loss, e.val_loss, e.val_accuracy) for e in by_copy]


def test_train_reports_divergence(tiny_split):
    config = training.TrainConfig(epochs=1, learning_rate=1e6, optimizer="sgd", device="cpu")
    with pytest.raises(FloatingPointError, match="lower learning_rate"):
        training.train(config, *tiny_split)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_cuda(tiny_split):
    result = training.train(training.TrainConfig(epochs=1, device="cuda"), *tiny_split)
    assert result.device.startswith("cuda")
    assert next(result.model.parameters()).device.type == "cpu"


def test_evaluate_predictions_against_hand_counts():
    y = np.array([0, 0, 1, 1, 2])
    probs = np.array([[.9, .1, 0], [.2, .8, 0], [0, 1, 0], [0, .6, .4], [.5, 0, .5]])
    ev = metrics.evaluate_predictions(y, probs, num_classes=3)
    assert ev.predictions.tolist() == [0, 1, 1, 1, 0]
    assert ev.accuracy == pytest.approx(3 / 5)
    assert ev.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert ev.precision.tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert ev.recall.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert ev.f1[1] == pytest.approx(0.8)
    expected_loss = -np.mean(np.log([.9, .2, 1, .6, .5]))
    assert ev.loss == pytest.approx(expected_loss)
    flat = ev.scalar_metrics()
    assert flat["test_accuracy"] == pytest.approx(0.6)
    assert flat["test_recall_class_1"] == 1.0 and "test_macro_f1" in flat
    rows = ev.per_class_rows(["a", "b", "c"])
    assert rows[2] == {"class": 2, "name": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0,
                       "roc_auc": 1.0, "pr_auc": 1.0, "support": 1}
    # The probability metrics, by hand: every image is in a calibration bin of its own, so
    # the ECE is the mean |right - confidence|; Brier sums each image's squared distance
    # to its one-hot label; the true class is always among the top two.
    assert ev.ece == pytest.approx((0.1 + 0.8 + 0.0 + 0.4 + 0.5) / 5)
    assert ev.brier == pytest.approx((0.02 + 1.28 + 0.0 + 0.32 + 0.5) / 5)
    assert ev.top2_accuracy == 1.0
    # Class 0: positives score .9 and .2, negatives 0, 0 and .5: 5 of 6 pairs ranked right.
    assert ev.roc_auc[0] == pytest.approx(5 / 6)
    assert flat["test_roc_auc_class_0"] == pytest.approx(5 / 6)
    assert flat["test_accuracy_ci_low"] < 0.6 < flat["test_accuracy_ci_high"]


def test_wilson_interval_matches_the_textbook_and_stays_in_bounds():
    low, high = metrics.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert metrics.wilson_interval(10, 10)[1] == 1.0 and metrics.wilson_interval(0, 10)[0] == 0.0
    narrow = metrics.wilson_interval(9545, 10000)
    assert narrow[0] < 0.9545 < narrow[1] and narrow[1] - narrow[0] < 0.01


def test_a_class_missing_from_the_labels_has_no_auc_and_no_nan_metric():
    y = np.array([0, 1, 0, 1])
    probs = np.array([[.7, .2, .1], [.1, .8, .1], [.6, .3, .1], [.3, .6, .1]])
    ev = metrics.evaluate_predictions(y, probs, num_classes=3)
    assert np.isnan(ev.roc_auc[2]) and np.isnan(ev.pr_auc[2])
    flat = ev.scalar_metrics()
    assert "test_roc_auc_class_2" not in flat
    assert not any(np.isnan(v) for v in flat.values())
    assert ev.per_class_rows(["a", "b", "c"])[2]["roc_auc"] == ""
    assert [k for k, *_ in metrics.curves(y, probs, "roc")] == [0, 1]


def test_evaluate_predictions_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        metrics.evaluate_predictions(np.array([], int), np.zeros((0, 10)))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def test_figures_render():
    cm = np.array([[5, 1], [0, 4]])
    assert _png(plots.confusion_matrix_figure(cm, ["0", "1"]))[:4] == b"\x89PNG"
    assert _png(plots.confusion_matrix_figure(cm, ["cat", "dog"], normalized=True))[:4] == b"\x89PNG"
    images = np.random.default_rng(0).integers(0, 255, (8, 28, 28), dtype=np.uint8)
    y_true, y_pred = np.arange(8) % 2, np.zeros(8, int)
    fig = plots.misclassified_figure(images, y_true, y_pred, np.linspace(0, 1, 8), ["0", "1"])
    assert "4 of 8" in fig.axes[0].get_title()
    assert len(fig.axes[0].texts) == 4  # one label per wrong prediction
    perfect = plots.misclassified_figure(images, y_pred, y_pred, np.ones(8), ["0", "1"])
    assert perfect.axes[0].get_title() == "no misclassified images" and not perfect.axes[0].texts
    assert _png(perfect)[:4] == b"\x89PNG"
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.7},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.8}]
    assert _png(plots.training_curves_figure(history))[:4] == b"\x89PNG"
    y = np.arange(40) % 4
    probs = np.full((40, 4), 0.1)
    probs[np.arange(40), y] = 0.7
    probs[::5] = probs[::5, ::-1]  # some mistakes
    for kind in ("roc", "pr"):
        fig = plots.class_curves_figure(metrics.curves(y, probs, kind), list("abcd"), kind)
        assert len(fig.axes[0].get_legend().get_texts()) == 4
        assert _png(fig)[:4] == b"\x89PNG"
    diagram = metrics.reliability(y, probs)
    assert _png(plots.reliability_figure(*diagram, metrics.expected_calibration_error(
        y, probs)))[:4] == b"\x89PNG"
    both = plots.calibration_and_roc_comparison_figure(
        [("v1", diagram, 0.1, metrics.micro_roc(y, probs)),
         ("v2", diagram, 0.2, metrics.micro_roc(y, probs))])
    assert _png(both)[:4] == b"\x89PNG"
    sweep = plots.search_history_figure([0.8, None, 0.9, 0.3], ["COMPLETE", "FAIL", "COMPLETE",
                                                                "PRUNED"])
    assert [line.get_label() for line in sweep.axes[0].lines] == [
        "complete", "best so far", "pruned (last report)"]
    importance = plots.importance_figure({"learning_rate": 0.7, "arch": 0.3})
    assert [t.get_text() for t in importance.axes[0].get_yticklabels()] == ["arch",
                                                                            "learning_rate"]


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_optimizers_take_the_same_steps_as_the_reference(name):
    """The fused kernels are a speed-up, not another update rule."""
    def run(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        net = model.build_model("mlp", (16, 8))
        if fused:
            optimizer = training.make_optimizer(name, net.parameters(), 1e-2, torch.device("cpu"))
            assert optimizer.defaults["fused"]
        elif name == "adam":
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        else:
            optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
        x, y = torch.rand(32, 28, 28) * 255, torch.randint(0, 10, (32,))
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    torch.testing.assert_close(run(fused=True), run(fused=False), atol=1e-5, rtol=1e-4)


def test_compare_predictions_counts_per_class_and_the_disagreements():
    from steps.core.metrics import compare_predictions

    y = np.array([0, 0, 1, 1, 2])
    holder = np.array([0, 1, 1, 1, 0])
    challenger = np.array([0, 0, 0, 1, 2])
    comparison = compare_predictions(y, holder, challenger, ["a", "b", "c"])
    assert [(r["holder_accuracy"], r["challenger_accuracy"]) for r in comparison.rows] == [
        (0.5, 1.0), (1.0, 0.5), (0.0, 1.0)]
    assert comparison.only_holder_right.tolist() == [2]
    assert comparison.only_challenger_right.tolist() == [1, 4]
    with pytest.raises(ValueError, match="different lengths"):
        compare_predictions(y, holder[:3], challenger, ["a", "b", "c"])
