"""The example notebooks and the public `nitsum_jax` API they use.

Each notebook runs top to bottom in a fresh IPython kernel of this interpreter (a kernel spec
written to a temporary folder, so a fresh machine needs no `ipykernel install`), with the repo
root as working directory and without the suite's XLA_FLAGS: the notebook must ask for its host
devices itself. A cell that raises fails the test. Stored notebooks carry no outputs and match
notebooks/make_notebooks.py, the source they are written from.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["plan_explorer.ipynb", "priority_lanes.ipynb"]
CELL_TIMEOUT_S = 600  # start-up compiles every lane on a 2-core machine; generous on purpose


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory):
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / "python3")  # argv: this interpreter -m ipykernel_launcher
    return kernels


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_generator(name):
    assert (NOTEBOOKS / name).read_text() == _generator().render(name), \
        f"{name} differs from notebooks/make_notebooks.py: run `python notebooks/make_notebooks.py`"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_every_cell_without_error(name, kernel_spec_dir):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the notebook sets its own devices
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)  # raises CellExecutionError naming the cell on the first error
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    assert all(cell.execution_count for cell in nb.cells if cell.cell_type == "code")


def test_importing_nitsum_jax_does_not_import_jax_until_a_name_is_used():
    code = ("import sys, nitsum_jax as nj; assert 'jax' not in sys.modules; "
            "nj.use_host_devices(3); assert 'jax' not in sys.modules; "
            "import os; assert os.environ['XLA_FLAGS'].endswith('--xla_force_host_platform_device_count=3'); "
            "nj.SamplingParams; import jax; assert jax.device_count() == 3, jax.device_count(); "
            "assert all(getattr(nj, n) is not None for n in nj.__all__)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_use_host_devices_replaces_a_count_already_in_xla_flags(monkeypatch):
    import nitsum_jax as nj

    monkeypatch.delitem(sys.modules, "jax", raising=False)  # as before JAX is imported: the flag alone
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2")
    nj.use_host_devices(4)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"


def test_use_host_devices_after_jax_with_fewer_devices_says_how_to_fix_it(monkeypatch):
    import jax

    import nitsum_jax as nj

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    have = jax.device_count()
    nj.use_host_devices(have)  # enough devices: no error
    with pytest.raises(RuntimeError, match=rf"sees {have} device.*use_host_devices\({have + 1}\) before"):
        nj.use_host_devices(have + 1)


def test_use_host_devices_refuses_a_count_below_one():
    import nitsum_jax as nj

    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        nj.use_host_devices(0)


def test_plan_memory_of_the_default_70b_set_on_8_devices_matches_the_cli_report():
    import json

    import nitsum_jax as nj

    report = nj.plan_memory("llama-3.1-70b", None, 8)
    cli = subprocess.run([sys.executable, "-m", "nitsum_jax.cli", "--devices", "8", "plans", "--preset",
                          "llama-3.1-70b", "--json"], check=True, capture_output=True, text=True, cwd=ROOT)
    expected = json.loads(cli.stdout)
    # the CLI lists the plans as strings and gives their weights under "plan_weights"
    assert [str(p) for p in report["plans"]] == expected["plans"]
    assert [p.name for p in report["plans"]] == list(report["per_plan"]) == list(expected["plan_weights"])
    assert report["per_plan"]["static"]["weights_total"] == expected["plan_weights"]["static"]["weights_total"]
    assert {str(d): use for d, use in report["devices"].items()} == expected["devices"]
    assert report["weight_overhead"] == pytest.approx(expected["weight_overhead"])
    with pytest.raises(nj.PlanError, match="device 0 needs .* but has 80.00 GiB"):
        nj.plan_memory("llama-3.1-70b", None, 4, device_memory_gib=80)
