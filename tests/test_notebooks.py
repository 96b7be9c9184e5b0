"""Every notebook in notebooks/ runs top to bottom without an error, on the real data.

Each is executed with nbclient in a fresh ``python3`` kernel of *this* interpreter (a
kernel spec written to a temp ``JUPYTER_PATH``, so a system-wide "python3" kernel of
another Python is never picked up), with ``METAFEW_DATA``/``METAFEW_CACHE`` inherited
from the test session and one intra-op thread (pytest-xdist runs two workers on two
cores). The notebooks themselves are not modified.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture()
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path) -> Path:
    from ipykernel.kernelspec import write_kernel_spec

    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    write_kernel_spec(str(spec_dir))  # argv: this sys.executable -m ipykernel_launcher
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("METAFEW_DATA", str(data_root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / "run"
    work.mkdir()
    return work


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env: Path) -> None:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve(), spec.argv
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(kernel_env)}})
    client.execute(env=dict(os.environ))
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors, errors


def test_notebooks_found() -> None:
    assert any(p.name == "medical_adaptation.ipynb" for p in NOTEBOOKS)


def _code_and_outputs(path: Path) -> tuple[str, str]:
    import json

    nb = json.loads(path.read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    outputs = json.dumps([o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])])
    return code, outputs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_hold_no_developer_paths(path: Path) -> None:
    """What a reader sees before running a notebook names no folder of the machine it was run on."""
    import re

    _, outputs = _code_and_outputs(path)
    found = sorted(set(re.findall(r"(?<![\w.])/(?:work|tmp|root|home)/[^\s\"'\\]*", outputs)))
    assert not found, f"{path.name}: stored outputs show absolute paths {found[:5]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_fetch_their_datasets_on_first_use(path: Path) -> None:
    """Each dataset a notebook loads passes ``download=True`` (as torchvision's examples do): a fresh machine runs it."""
    import re

    code, _ = _code_and_outputs(path)
    calls = re.findall(
        r"\b(?:load_dataset|MedMNIST|Omniglot|train_run|pretrain_run|evaluate_run)\([^()]*(?:\([^()]*\)[^()]*)*\)", code
    )
    missing = [c for c in calls if "download=True" not in c]
    assert not missing, f"{path.name}: these calls fail where the data root is empty: {missing}"


def test_medical_notebook_output_matches_the_summary_wording() -> None:
    """The stored adapt summary is what the code prints now ("2.5-97.5% of single draws"), not an older wording."""
    _, outputs = _code_and_outputs(next(p for p in NOTEBOOKS if p.name == "medical_adaptation.ipynb"))
    assert "2.5-97.5% of single draws" in outputs
    assert "(single draws " not in outputs
