"""What the entry scripts share, in isolation."""

from __future__ import annotations

from importlib.metadata import version

from steps.tracking.inference.models import requirement_mismatches


def test_requirement_mismatches_name_only_what_differs(tmp_path):
    numpy = version("numpy")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join([
        "# comment", "-c constraints.txt", "",
        f"numpy=={numpy}",  # satisfied
        "click==0.0.1",  # installed, other version
        "surely-not-installed-pkg==1.0",  # missing
        "not a requirement ===",  # unparsable lines are skipped, as MLflow does
    ]))
    found = requirement_mismatches(str(requirements))
    assert found == [
        f"click==0.0.1 (installed: {version('click')})",
        "surely-not-installed-pkg==1.0 (installed: none)",
    ]


def test_a_model_without_requirements_file_has_no_mismatches(tmp_path):
    assert requirement_mismatches(str(tmp_path / "requirements.txt")) == []
