"""MLproject is the single source of truth: every click script must declare exactly its
params; conda.yaml carries exactly the pins. (Where files sit: test_layout.py.)"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import click
import pytest
import yaml

from tools import conda_env

ROOT = Path(__file__).parent.parent
PROJECT = yaml.safe_load((ROOT / "MLproject").read_text())
ENTRY_POINTS = PROJECT["entry_points"]
CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "string": click.STRING}


def _command(entry_point: str) -> click.Command:
    return importlib.import_module(f"steps.{entry_point}").cli


def _type_name(param: click.Parameter) -> str:
    t = param.type
    if isinstance(t, click.IntRange) or t is click.INT:
        return "int"
    if isinstance(t, click.FloatRange) or t is click.FLOAT:
        return "float"
    return "string"  # STRING, Choice and BOOL all arrive as strings from MLproject


def test_the_card_entry_points_exist():
    assert {"main", "download_data", "train", "evaluate", "register"} <= set(ENTRY_POINTS)
    assert PROJECT["conda_env"] == "conda.yaml"


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_click_options_match_mlproject(entry_point):
    declared = ENTRY_POINTS[entry_point]["parameters"]
    options = {p.name: p for p in _command(entry_point).params if isinstance(p, click.Option)}
    assert set(options) == set(declared)
    for name, spec in declared.items():
        param = options[name]
        assert _type_name(param) == spec["type"], name
        assert f"--{name.replace('_', '-')} {{{name}}}" in ENTRY_POINTS[entry_point]["command"]
        if "default" not in spec:  # required in MLproject, so required in click
            assert param.required, name
            continue
        default = param.default
        if isinstance(default, bool):
            default = str(default).lower()
        assert default == spec["default"], name


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_every_entry_point_has_a_docstring_naming_reads_and_writes(entry_point):
    doc = importlib.import_module(f"steps.{entry_point}").__doc__ or ""
    assert "Reads:" in doc and "Writes:" in doc


def test_train_config_defaults_match_mlproject():
    from steps.core.training import TrainConfig

    declared = ENTRY_POINTS["train"]["parameters"]
    checked = 0
    for field in dataclasses.fields(TrainConfig):
        if field.name not in declared:
            continue
        default = field.default if field.name != "hidden" else ""
        assert str(default) == str(declared[field.name]["default"]), field.name
        checked += 1
    assert checked == len(dataclasses.fields(TrainConfig))


def test_conda_env_lists_exactly_the_pinned_requirements():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert pip_section == conda_env.pins()
    # Read from the pins, not written here: a Dependabot pull request moves them.
    assert {"torch", "torchvision", "mlflow"} <= {pin.split("==")[0] for pin in pip_section}
    # MLflow names the conda environment by conda.yaml's text; an included file would let
    # a pin change without the name changing.
    assert not [line for line in pip_section if line.startswith("-")]
    assert (ROOT / "conda.yaml").read_text() == conda_env.render()


def test_a_pin_change_changes_conda_yaml(tmp_path):
    torch = next(pin for pin in conda_env.pins() if pin.startswith("torch=="))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text((ROOT / "requirements.txt").read_text().replace(
        torch + "\n", "torch==99.0.0\n"))
    assert conda_env.render(requirements) != conda_env.render()
    assert "torch==99.0.0" in conda_env.render(requirements)


def test_setup_and_ci_install_the_same_pins():
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev
    assert "requirements-dev.txt" in (ROOT / "Makefile").read_text()
