"""The served model: pyfunc in every accepted layout, a real `mlflow models serve`, predict."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from helpers.docs import documented_python
from helpers.processes import (
    PROJECT_DIR,
    VENV_BIN,
    assert_clean_failure,
    free_port,
    mlflow_run,
    run_step,
    start_listening,
    subprocess_env,
)
from steps.core.data import load_digits_dataset
from steps.tracking.runtime.cli import run_cli


@pytest.fixture(scope="module")
def digits():
    ds = load_digits_dataset()
    return ds.x_test[:16], ds.y_test[:16]


def test_pyfunc_takes_raw_images_in_every_layout_without_pickle(champion, digits, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(champion["model_uri"])
    images, labels = digits
    reference = model.predict(images)  # uint8 (N, 28, 28)
    assert list(reference.columns) == ["label", "probabilities"]
    probabilities = np.stack(reference["probabilities"].to_numpy())
    assert probabilities.shape == (16, 10)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert (reference["label"].to_numpy() == probabilities.argmax(1)).all()
    assert (reference["label"].to_numpy() == labels).mean() >= 0.75
    for variant in (images.astype(np.float32), images[:, None].astype(np.float64),
                    images.reshape(16, 784), pd.DataFrame(images.reshape(16, 784)),
                    images.tolist()):
        out = model.predict(variant)
        assert (out["label"].to_numpy() == reference["label"].to_numpy()).all()


def test_pyfunc_rejects_wrong_shapes_clearly(champion):
    model = mlflow.pyfunc.load_model(champion["model_uri"])
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        model.predict(np.zeros((2, 32, 32), np.float32))


NOT_PIXELS = {
    "NaN": (np.full((1, 28, 28), np.nan), "not finite"),
    "infinity": (np.full((1, 784), np.inf), "not finite"),
    "negative": (np.full((2, 28, 28), -500.0), "from -500 to -500"),
    "huge": (np.full((1, 28, 28), 1e30), "from 0 to 255"),
    "a number": (np.float32(7), "a single number"),
    "empty": (np.zeros((0, 28, 28)), "no images"),
    "text": (np.array([["a"] * 784]), "pixels must be numbers"),
    "ragged": ([[0] * 784, [0] * 3], "images of one shape"),
}


@pytest.mark.parametrize("case", sorted(NOT_PIXELS))
def test_pyfunc_refuses_what_is_not_pixels_saying_why(champion, case):
    model = mlflow.pyfunc.load_model(champion["model_uri"])
    bad, words = NOT_PIXELS[case]
    with pytest.raises(ValueError, match="^images: ") as refused:
        model.predict(bad)
    assert words in str(refused.value)


def test_registered_signature_names_label_and_probabilities(champion):
    info = mlflow.models.get_model_info(champion["model_uri"])
    outputs = [c["name"] for c in json.loads(info.signature.to_dict()["outputs"])]
    assert outputs == ["label", "probabilities"]


def post(url: str, payload: dict, status: int = 200):
    """The JSON a POST of ``payload`` gets back, with HTTP ``status``."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            code, body = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        code, body = error.code, error.read().decode()
    assert code == status, body[:2000]
    return json.loads(body)  # strict: a NaN in the answer would not parse


@pytest.mark.slow
def test_mlflow_models_serve_matches_pyfunc(champion, digits, tmp_path):
    images, _ = digits
    server, port = start_listening(
        lambda port: [os.path.join(VENV_BIN, "mlflow"), "models", "serve", "-m",
                      champion["model_uri"], "--env-manager", "local", "--host", "127.0.0.1",
                      "--port", str(port)],
        tmp_path / "serve.log", "/ping", cwd=champion["root"])
    try:
        expected = mlflow.pyfunc.load_model(champion["model_uri"]).predict(images)
        for payload in ({"inputs": images.tolist()},                  # (N, 28, 28) ints
                        {"inputs": images[:, None].tolist()},          # (N, 1, 28, 28)
                        {"instances": images.reshape(16, 784).tolist()}):
            predictions = post(f"http://127.0.0.1:{port}/invocations", payload)["predictions"]
            assert [p["label"] for p in predictions] == expected["label"].tolist()
            served = np.array([p["probabilities"] for p in predictions])
            assert np.allclose(served, np.stack(expected["probabilities"].to_numpy()),
                               atol=1e-5)
        # What is not pixels: HTTP 400 saying why, without a stack trace or a path.
        for case, (bad, words) in NOT_PIXELS.items():
            inputs = bad if isinstance(bad, list) else np.asarray(bad).tolist()
            answer = post(f"http://127.0.0.1:{port}/invocations", {"inputs": inputs}, 400)
            if case != "ragged":  # MLflow's JSON parser refuses that before the model sees it
                assert words in answer["message"] and "images: " in answer["message"], case
            assert "stack_trace" not in answer and str(PROJECT_DIR) not in json.dumps(answer)
            assert "site-packages" not in json.dumps(answer), case
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_predict_prints_labels_for_pngs_and_npy(champion, digits, tmp_path):
    from PIL import Image

    images, _ = digits
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images[:5]):
        # Dark digit on white, as people draw them: predict must invert it.
        Image.fromarray(255 - image).resize((56, 56)).save(folder / f"digit_{i}.png")
    np.save(tmp_path / "digits.npy", images[:5])
    expected = mlflow.pyfunc.load_model(champion["model_uri"]).predict(images[:5])["label"]
    from_npy = run_step("predict", "--images", str(tmp_path / "digits.npy"))
    assert from_npy.returncode == 0, from_npy.stderr
    rows = [line.split("\t") for line in from_npy.stdout.splitlines()]
    assert [int(r[1]) for r in rows] == expected.tolist()
    from_png = run_step("predict", "--images", str(folder))
    assert from_png.returncode == 0, from_png.stderr
    png_labels = [int(line.split("\t")[1]) for line in from_png.stdout.splitlines()]
    assert (np.array(png_labels) == expected.to_numpy()).mean() >= 0.8


@pytest.mark.slow
def test_predict_under_mlflow_run_says_in_its_run_what_it_did(champion, digits, tmp_path):
    np.save(tmp_path / "digits.npy", digits[0][:3])
    result = mlflow_run("-e", "predict", "-P", f"images={tmp_path / 'digits.npy'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 3
    (run,) = mlflow.MlflowClient().search_runs(["0"], "tags.`pipeline.step` = 'predict'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["predicted_images"] == 3
    assert run.data.tags["pipeline.model_uri"] == champion["model_uri"]


@contextlib.contextmanager
def champion_with_added_code(marker: Path):
    """The champion's ``code/model.py`` in the artifact store, with a line added that would
    create ``marker``; restored afterwards. Yields (what refusals must name, the version)."""
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("mnist-classifier", "champion")
    assert len(version.tags["model_digest"]) == 64
    model_id = version.tags["model_uri"].removeprefix("models:/")
    folder = client.get_logged_model(model_id).artifact_location.removeprefix("file://")
    code = Path(folder) / "code" / "model.py"
    original = code.read_text()
    code.write_text(original + f"\nopen({str(marker)!r}, 'w').close()\n")
    try:
        yield f"mnist-classifier v{version.version}", version.version
    finally:
        code.write_text(original)


@pytest.mark.slow
def test_a_model_edited_behind_our_back_is_loaded_by_no_step(champion, digits, tmp_path):
    """Code added to the registered classifier's ``code/model.py`` in the artifact store:
    predict, evaluate and ``make serve``'s check each refuse it in one line naming the
    version; nothing of the added code runs."""
    marker = tmp_path / "the-added-code-ran"
    np.save(tmp_path / "digits.npy", digits[0][:2])
    with champion_with_added_code(marker) as (named, version):
        for result in (run_step("predict", "--images", str(tmp_path / "digits.npy")),
                       run_step("evaluate", "--model-uri", f"models:/mnist-classifier/{version}"),
                       subprocess.run([os.path.join(VENV_BIN, "mnist-pipeline-preflight"),
                                       "--model", champion["model_uri"]], capture_output=True,
                                      text=True, env=subprocess_env(), timeout=120)):
            assert_clean_failure(result, named, "has changed since it was recorded")
        assert not marker.exists()
    assert run_step("predict", "--images", str(tmp_path / "digits.npy")).returncode == 0


def v2_infer(url: str, images: np.ndarray) -> tuple[int, dict]:
    """One KServe V2 request with ``images`` as its only tensor: (HTTP status, answer)."""
    datatype = {"uint8": "UINT8", "float32": "FP32", "float64": "FP64"}[str(images.dtype)]
    body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": datatype,
                        "data": images.flatten().tolist()}]}
    request = urllib.request.Request(f"{url}/v2/models/mnist-classifier/infer",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_mlserver_serves_the_champion_with_pyfuncs_labels(champion, digits, tmp_path):
    """``make mlserver``: MLServer's MLflow runtime in an environment of its own (built here
    by ``make mlserver-env``), over the KServe V2 protocol. Every tensor layout gets
    pyfunc's labels and probabilities, pixels that are not pixels get HTTP 400 saying why,
    and a model edited behind our back is not loaded."""
    built = subprocess.run(["make", "-s", "-C", str(PROJECT_DIR), "mlserver-env"],
                           env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr

    def mlserver(port: int) -> list[str]:
        return ["make", "-s", "-C", str(PROJECT_DIR), "mlserver", f"MLSERVER_PORT={port}",
                f"MLSERVER_GRPC_PORT={free_port()}"]

    images, _ = digits
    expected = mlflow.pyfunc.load_model(champion["model_uri"]).predict(images)
    server, port = start_listening(mlserver, tmp_path / "mlserver.log",
                                   "/v2/models/mnist-classifier/ready")
    url = f"http://127.0.0.1:{port}"
    try:
        for layout in (images, images[:, None], images.reshape(16, 784),
                       images.astype(np.float32), images.reshape(16, 784).astype(np.float32)):
            status, answer = v2_infer(url, layout)
            assert status == 200, answer
            outputs = {o["name"]: o["data"] for o in answer["outputs"]}
            assert outputs["label"] == expected["label"].tolist()
            served = np.array([json.loads(row) for row in outputs["probabilities"]])
            assert np.allclose(served, np.stack(expected["probabilities"].to_numpy()),
                               atol=1e-5)
        for bad, words in ((np.full((2, 28, 28), 300.0), "from 0 to 255"),
                           (np.zeros((2, 27), np.float32), "28x28")):
            status, answer = v2_infer(url, bad)
            assert status == 400 and answer["error"].startswith("images: "), answer
            assert words in answer["error"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert "Traceback" not in (tmp_path / "mlserver.log").read_text()

    marker = tmp_path / "the-added-code-ran"
    with champion_with_added_code(marker) as (named, _):
        log = tmp_path / "edited.log"
        with open(log, "w") as output:
            # MLServer ends when a model fails to load at start-up (exit 0, its log says why).
            subprocess.run(mlserver(free_port()), env=subprocess_env(), stdout=output,
                           stderr=subprocess.STDOUT, timeout=180)
        assert "has changed since it was recorded" in log.read_text()
        assert named in log.read_text()
        assert not marker.exists()


def test_make_serve_without_a_champion_is_one_line(tracking_uri):
    result = subprocess.run(["make", "-s", "-C", str(PROJECT_DIR), "serve",
                             f"PORT={free_port()}"], env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert_clean_failure(result, "MODEL=models:/mnist-classifier@champion cannot be served",
                         "make run")


def test_make_serve_on_a_taken_port_names_the_port(tracking_uri):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(["make", "-s", "-C", str(PROJECT_DIR), "serve", f"PORT={port}"],
                                env=subprocess_env(), capture_output=True, text=True,
                                timeout=120)
    assert_clean_failure(result, f"PORT={port} on 127.0.0.1 is taken", f"PORT={port + 1}")


def test_predict_bad_inputs(champion, tmp_path):
    result = run_step("predict", "--images", str(tmp_path / "missing.png"))
    assert result.returncode != 0 and "error: images=" in result.stderr
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 5, 5)))
    assert_clean_failure(run_step("predict", "--images", str(bad)), "images=", "(N, 28, 28)")


def forged_npy(path, shape) -> None:
    """An .npy whose header claims ``shape`` of float64 but holds 16 bytes of data."""
    header = {"descr": "<f8", "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 16)


@pytest.mark.parametrize("case", [*sorted(NOT_PIXELS), "forged header", "objects",
                                  "huge png", "big png"])
def test_predict_refuses_what_is_not_pixels_in_one_line_naming_images(champion, tmp_path,
                                                                      capsys, case):
    """In-process, through the ``run_cli`` wrapper ``python -m steps.predict`` runs
    (``test_predict_bad_inputs`` goes through a real process)."""
    from PIL import Image

    from steps.predict import cli as predict

    path = tmp_path / "bad.npy"
    if case == "forged header":  # 6 TB claimed by a 100-byte file
        forged_npy(path, (1_000_000_000, 28, 28))
        words = "header claims"
    elif case == "objects":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        words = "Python objects"
    elif case == "huge png":  # over PIL's own limit: it will not even open it
        path = tmp_path / "huge.png"
        Image.new("L", (15000, 15000)).save(path)
        words = "too large for a digit image"
    elif case == "big png":  # under PIL's limit, over a digit's
        path = tmp_path / "big.png"
        Image.new("L", (5000, 5000)).save(path)
        words = "5000x5000 pixels, too large for a digit image"
    else:
        bad, words = NOT_PIXELS[case]
        if isinstance(bad, list):
            np.save(path, np.array(bad, dtype=object), allow_pickle=True)
            words = "Python objects"
        else:
            np.save(path, bad)
    with pytest.raises(SystemExit) as exited:
        run_cli(predict, ["--images", str(path)])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: images") and words in errors[0], errors[0]


OLD_LAYOUT_SCRIPT = """
import importlib, sys
import numpy as np, mlflow, torch
from steps.core.model import build_model

log_classifier = importlib.import_module(sys.argv[3]).log_classifier
torch.manual_seed(0)
network = build_model("mlp").eval()
images = np.load(sys.argv[1])
with torch.no_grad():
    expected = network(torch.from_numpy(images)).argmax(1).numpy()
np.save(sys.argv[2], expected)
with mlflow.start_run():
    print(log_classifier(network, "mlp", None, images[:2]).model_uri)
"""

# Each earlier home of the served model's code, and the module that logged it there: the
# library before steps/tracking/, and the flat steps/tracking/ before its rooms.
OLD_LAYOUTS = {"steps/serving.py": "steps.artifacts",
               "steps/tracking/serving.py": "steps.tracking.artifacts"}


def old_layout(dest, served: str) -> str:
    """The project as it was just before ``served`` moved away, from git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              check=True).stdout.strip()

    moved = git("log", "--diff-filter=D", "--format=%H", "-1", "--", served)
    assert moved, f"git history has no commit that moved {served} (a shallow clone?)"
    subprocess.run(f"git archive {moved}^ steps | tar -x -C {dest}", shell=True, check=True,
                   cwd=PROJECT_DIR)
    assert (dest / served).is_file()
    return moved


@pytest.mark.parametrize("served", OLD_LAYOUTS)
def test_a_classifier_logged_by_an_old_layout_still_loads_and_serves(tracking_uri, tmp_path,
                                                                     digits, served):
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    old = tmp_path / "old"
    old.mkdir()
    old_layout(old, served)
    images = digits[0].astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    logged = subprocess.run(
        [sys.executable, "-c", OLD_LAYOUT_SCRIPT, str(tmp_path / "images.npy"),
         str(tmp_path / "expected.npy"), OLD_LAYOUTS[served]],
        cwd=old, env={**subprocess_env(), "PYTHONPATH": str(old)}, capture_output=True,
        text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-3000:]
    model_uri = logged.stdout.split()[-1]
    expected = np.load(tmp_path / "expected.npy")
    # Loaded and served here, where that file no longer exists.
    assert not (PROJECT_DIR / served).exists()
    model = mlflow.pyfunc.load_model(model_uri)
    assert model.predict(images)["label"].tolist() == expected.tolist()
    # The app `mlflow models serve` runs, without its process start-up.
    client = TestClient(scoring_server.init(model))
    response = client.post("/invocations", json={"inputs": images.tolist()})
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == expected.tolist()


def test_mlflow_evaluate_takes_the_classifiers_labels_as_its_predictions(champion, digits):
    """MLflow's classifier evaluator reads one column of labels; the classifier answers two
    (label, probabilities). The documented route: the label column as `predictions=`."""
    images, labels = digits
    model = mlflow.pyfunc.load_model(champion["model_uri"])
    table = pd.DataFrame({"pixels": list(images.reshape(len(images), 784)), "target": labels})
    table["prediction"] = model.predict(table[["pixels"]])["label"]  # a DataFrame of arrays
    with mlflow.start_run():
        result = mlflow.models.evaluate(data=table[["target", "prediction"]],
                                        targets="target", predictions="prediction",
                                        model_type="classifier")
    expected = (model.predict(images)["label"].to_numpy() == labels).mean()
    assert result.metrics["accuracy_score"] == pytest.approx(expected)
    assert "confusion_matrix" in result.artifacts


@pytest.mark.slow
def test_the_documented_onnx_export_answers_like_pyfunc(champion, digits, tmp_path,
                                                        monkeypatch):
    import onnxruntime

    monkeypatch.chdir(tmp_path)
    exec(documented_python("serving.md", "## Export: ONNX and a plain state_dict"), {})
    images, _ = digits
    session = onnxruntime.InferenceSession("mnist.onnx")
    probabilities = session.run(None, {"images": images.astype(np.float32)})[0]
    expected = mlflow.pyfunc.load_model(champion["model_uri"]).predict(images)
    assert probabilities.argmax(1).tolist() == expected["label"].tolist()
    assert np.allclose(probabilities, np.stack(expected["probabilities"].to_numpy()), atol=1e-5)
    # and the plain state_dict loads into a fresh network of the same architecture
    import torch

    state = torch.load("mnist-network.pt", weights_only=True)
    assert set(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def test_a_csv_without_its_header_line_is_told_so_and_one_with_it_is_answered(champion,
                                                                              digits):
    """MLflow's CSV parser takes a CSV's first line as its header: one headerless row of
    784 pixels arrives as column names and no rows."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(champion["model_uri"])
    client = TestClient(scoring_server.init(model))
    images, _ = digits
    rows = [",".join(str(int(v)) for v in image.reshape(784)) for image in images[:2]]
    for headerless in (rows[0], "\n".join(rows)):
        response = client.post("/invocations", content=headerless,
                               headers={"Content-Type": "text/csv"})
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith("images: the CSV has no header line")
    header = ",".join(f"p{i}" for i in range(784))
    response = client.post("/invocations", content="\n".join([header, *rows]),
                           headers={"Content-Type": "text/csv"})
    assert response.status_code == 200, response.text
    assert [p["label"] for p in response.json()["predictions"]] == (
        model.predict(images[:2])["label"].tolist())
