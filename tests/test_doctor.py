"""The doctor: its report on this machine (no GPU), its parsers, profile fitting on simulated devices, and the
quick report stored with every real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack import devices, doctor
from llmstack.cli import CONFIG_DIR

CONFIG = Path(CONFIG_DIR)
HAS_GPU = devices.detect().best() != "cpu" or Path("/dev/dri").exists()


@pytest.fixture(scope="module")
def full_report() -> dict:
    # One full report for the module: it imports torch in the interpreter (a few seconds on 2 cores).
    return doctor.collect([sys.executable])


@pytest.mark.skipif(HAS_GPU, reason="this checks the report of a machine without GPUs")
def test_report_on_a_machine_without_gpus(full_report: dict) -> None:
    assert full_report["devices"] == {"cuda": [], "xpu": []}
    assert full_report["render_nodes"] == []
    assert full_report["summary"][0].startswith("No GPU:")
    fitting = [p["profile"] for p in full_report["profiles"] if p["fits"] == "yes"]
    assert fitting == ["cpu"]
    a770 = next(p for p in full_report["profiles"] if p["profile"] == "arc_a770x2")
    assert a770["fits"] == "no" and "needs 2 xpu device(s), found 0" in a770["why"]
    (probe,) = full_report["interpreters"]
    assert probe["torch"]["cuda_available"] is False and probe["torch"]["xpu_available"] is False
    assert probe["torch"]["devices"] == []


def test_report_has_host_facts_and_engine_versions(full_report: dict) -> None:
    host = full_report["host"]
    assert host["cpu_count"] == len(os.sched_getaffinity(0))
    assert host["ram_total_gib"] > 0 and host["shm_gib"] > 0
    (probe,) = full_report["interpreters"]
    import torch
    import transformers

    # Versions as the engine interpreter's metadata says, which this test's interpreter can check.
    assert probe["packages"]["torch"] == torch.__version__
    assert probe["packages"]["transformers"] == transformers.__version__
    assert probe["torch"]["version"] == torch.__version__
    assert {p["profile"] for p in full_report["profiles"]} == {
        p.stem for p in (CONFIG / "profile").glob("*.yaml")
    }


def test_text_report_says_what_fits(full_report: dict) -> None:
    text = doctor.render(full_report)
    assert "Profiles that fit:" in text and "Engine interpreters" in text and sys.executable in text
    if not HAS_GPU:
        assert "No GPU" in text and "sycl-ls: not installed" in text


def test_cli_prints_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llmstack.doctor", "--quick", "--json", "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "quick" and "torch" not in report["interpreters"][0]
    assert "sycl-ls" not in report["tools"]  # quick: nothing that touches the GPUs


def test_a_broken_interpreter_is_reported_not_raised(tmp_path: Path) -> None:
    found = doctor.probe_interpreter(str(tmp_path / "no-python"), with_devices=False, timeout=5)
    assert "error" in found


# The seed's sample (docker/llm/serving/xpu/docker/README.md), and the newer Unified Runtime format.
SYCL_LS_OLD = "\n".join(
    [
        "[opencl:acc:0] Intel(R) FPGA Emulation Platform for OpenCL(TM), Intel(R) FPGA Emulation Device 1.2 "
        "[2023.16.7.0.21_160000]",
        "[opencl:cpu:1] Intel(R) OpenCL, 13th Gen Intel(R) Core(TM) i9-13900K 3.0 [2023.16.7.0.21_160000]",
        "[opencl:gpu:2] Intel(R) OpenCL Graphics, Intel(R) Arc(TM) A770 Graphics 3.0 [23.17.26241.33]",
        "[ext_oneapi_level_zero:gpu:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26241]",
    ]
)
UR_B60 = "Intel(R) oneAPI Unified Runtime over Level-Zero, Intel(R) Arc(TM) Pro B60 Graphics"
SYCL_LS_NEW = "\n".join(
    [
        f"[level_zero:gpu][level_zero:0] {UR_B60} 20.1.0 [1.6.33276+22]",
        f"[level_zero:gpu][level_zero:1] {UR_B60} 20.1.0 [1.6.33276+22]",
        "[opencl:gpu][opencl:0] Intel(R) OpenCL Graphics, Intel(R) Arc(TM) Pro B60 Graphics OpenCL 3.0 NEO "
        " [25.18.33578]",
    ]
)


def test_sycl_ls_parsing() -> None:
    # Older oneAPI named the backend ext_oneapi_level_zero.
    (old,) = devices.parse_sycl_ls(SYCL_LS_OLD.replace("ext_oneapi_level_zero", "level_zero"))
    assert (old.index, old.name, old.driver) == (0, "Intel(R) Arc(TM) A770 Graphics", "1.3.26241")
    new = devices.parse_sycl_ls(SYCL_LS_NEW)
    assert [(d.index, d.name) for d in new] == [(i, "Intel(R) Arc(TM) Pro B60 Graphics") for i in (0, 1)]
    assert new[0].driver == "1.6.33276+22"


def test_render_nodes_from_sysfs(tmp_path: Path) -> None:
    dev, sys_drm = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    (dev / "renderD128").touch()
    pci = tmp_path / "pci" / "0000:03:00.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x8086\n")
    (pci / "device").write_text("0x56a0\n")
    (pci / "driver").symlink_to(tmp_path / "drivers" / "i915", target_is_directory=True)
    (tmp_path / "drivers" / "i915").mkdir(parents=True)
    (sys_drm / "renderD128").mkdir(parents=True)
    (sys_drm / "renderD128" / "device").symlink_to(pci, target_is_directory=True)
    (node,) = devices.render_nodes(dev, sys_drm)
    assert (node.vendor, node.device_id, node.driver, node.pci_address) == (
        "0x8086",
        "0x56a0",
        "i915",
        pci.name,
    )


def simulated(kind: str, names: list[str | None], memory: float | None = None) -> dict[str, list[dict]]:
    listed = [{"kind": kind, "index": i, "name": n, "memory_gib": memory} for i, n in enumerate(names)]
    return {"cuda": [], "xpu": [], kind: listed}


def fits(found: dict[str, list[dict]]) -> dict[str, str]:
    return {p["profile"]: p["fits"] for p in doctor.profile_fits(found, CONFIG)}


def test_two_a770s_fit_the_one_and_two_card_profiles() -> None:
    verdicts = fits(simulated("xpu", ["Intel(R) Arc(TM) A770 Graphics"] * 2, memory=15.11))
    assert {p for p, v in verdicts.items() if v == "yes"} == {"arc_a770", "arc_a770x2", "cpu"}
    assert verdicts["arc_a770x4"] == verdicts["arc_b580"] == verdicts["h100"] == "no"


def test_an_8_gb_a770_does_not_fit() -> None:
    verdicts = fits(simulated("xpu", ["Intel(R) Arc(TM) A770 Graphics"], memory=7.5))
    assert verdicts["arc_a770"] == "no"


def test_max_1550_tiles_and_h100() -> None:
    max_1550 = fits(simulated("xpu", ["Intel(R) Data Center GPU Max 1550"] * 2, memory=64.0))
    assert max_1550["max_1550"] == "yes" and max_1550["max_1100"] == "no"
    h100 = fits(simulated("cuda", ["NVIDIA H100 80GB HBM3"], memory=79.18))
    assert h100["h100"] == "yes"
    assert fits(simulated("cuda", ["NVIDIA H200"], memory=139.8))["h100"] == "no"


def test_unknown_card_model_is_a_maybe() -> None:
    verdicts = fits(simulated("xpu", [None]))
    assert verdicts["arc_a770"] == verdicts["arc_b580"] == "maybe"
    assert verdicts["arc_a770x2"] == "no"


def test_igpu_names() -> None:
    for name in ("Intel(R) Arc(TM) Graphics", "Intel(R) Arc(TM) 140V GPU (16GB)", "Intel(R) Graphics"):
        assert fits(simulated("xpu", [name], memory=8.0))["core_ultra_igpu"] == "yes", name
    assert fits(simulated("xpu", ["Intel(R) Arc(TM) A770 Graphics"], memory=15.11))["core_ultra_igpu"] == "no"


def test_quick_report_is_written_beside_a_run(compose_cfg, tmp_path: Path) -> None:
    """The quick doctor report is written after the run, never while the engine starts or is measured."""
    from llmstack.config.resolve import resolve, to_run_config
    from llmstack.devices import Inventory
    from llmstack.engines import get_engine
    from llmstack.run import Session

    run = resolve(to_run_config(compose_cfg(f"results_dir={tmp_path}", "engine.port=0")), CONFIG, Inventory())
    session = Session(run, get_engine("vllm").plan(run))
    session._record_inputs()
    assert not session.rundir.file("doctor.json").exists()
    session._record_doctor()
    report = json.loads(session.rundir.file("doctor.json").read_text())
    assert report["mode"] == "quick" and report["interpreters"][0]["python"]
    assert report["elapsed_s"] < 5
