"""Turn Hydra's composed DictConfig into a typed, fully resolved RunConfig.

Resolution fills the values a user may leave to llmstack: the device behind `auto`, the low-bit format
behind `auto`, the served name, context length, interpreter and the generated model's path. It reads the
host (device inventory) but starts nothing and writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from llmstack import devices
from llmstack.config.architecture import with_config_json
from llmstack.config.schema import DeviceConfig, LowBitConfig, RunConfig
from llmstack.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "xpu", "cuda")


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The composed config as dataclasses; a key its schema does not have (`+engine.max_num_seq=64`) or a
    missing mandatory value becomes a ConfigError."""
    from llmstack.config.unknown_keys import unknown_key_error

    if (unknown := unknown_key_error(cfg)) is not None:
        raise unknown
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(key, "???", "is required and has no value.", hint=f"Set it: {key}=...")
    try:
        run = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, "???", "is required and has no value.", hint=f"Set it: {key}=...") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(exc.full_key or "?", "?", str(exc).splitlines()[0]) from exc
    assert isinstance(run, RunConfig)
    return run


def no_such_device(name: str, inventory: devices.Inventory) -> ConfigError:
    here = [f"{inventory.count(kind)} {kind}" for kind in ("cuda", "xpu") if inventory.count(kind)]
    return ConfigError(
        "device",
        name,
        f"this machine has no {name} device ({', '.join(here) or 'only the cpu'} here).",
        [kind for kind in DEVICE_CHOICES if kind == "auto" or inventory.count(kind)],
        hint="To render the plan for a machine that has them, add dry_run=true (with device.count=N for "
        "N devices); python -m llmstack.doctor shows what this machine has.",
    )


def planned_devices(device: DeviceConfig, inventory: devices.Inventory | None = None) -> str:
    """How a dry run's header states the devices: `(x2)`, and whether this machine has them."""
    if device.name == "cpu":
        return f"(x{device.count})"
    here = (inventory or devices.detect()).count(device.name)
    if device.count is None or here >= device.count:
        return f"(x{device.count})"
    what = "none" if here == 0 else f"only {here}"
    return f"(x{device.count}; this machine has {what}: a plan for another machine, device.count=N for N)"


def load_low_bit(config_dir: Path, name: str) -> LowBitConfig:
    """One low_bit group option, read from configs/low_bit/<name>.yaml."""
    path = config_dir / "low_bit" / f"{name}.yaml"
    if not path.is_file():
        from llmstack.config.groups import config_groups

        choices = config_groups(Path(config_dir)).options("low_bit")
        raise ConfigError("low_bit", name, "has no file in configs/low_bit.", choices)
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.structured(LowBitConfig), raw)
    low_bit = OmegaConf.to_object(merged)
    assert isinstance(low_bit, LowBitConfig)
    return low_bit


def resolve(
    run: RunConfig,
    config_dir: Path,
    inventory: devices.Inventory | None = None,
) -> RunConfig:
    from llmstack.engines import get_engine

    if run.device.name not in DEVICE_CHOICES:
        raise ConfigError("device", run.device.name, "is not a device kind.", DEVICE_CHOICES)
    engine = get_engine(run.engine.name)

    device = run.device
    if device.name == "auto" or device.count is None:
        inventory = inventory or devices.detect()
        name = inventory.best() if device.name == "auto" else device.name
        count = inventory.count(name) if device.count is None else device.count
        if count == 0 and device.count is None:
            # device=xpu on a machine without one: a dry run plans for another machine, with the devices
            # its plan needs (render_dry_run says so); a real run cannot start here.
            if not run.dry_run:
                raise no_such_device(name, inventory)
            count = run.engine.devices_needed()
        device = dataclasses.replace(device, name=name, count=count)

    low_bit = run.low_bit
    if low_bit.name == "auto":
        low_bit = load_low_bit(config_dir, engine.default_low_bit(run.engine))

    model = run.model
    if model.generator == "tiny" and model.path is None:
        from llmstack.models.tiny import tiny_model_dir

        model = dataclasses.replace(model, path=str(tiny_model_dir()))
    if model.served_name is None:
        # model=local: clients ask for "Qwen2.5-7B-Instruct" (its directory), not for "local".
        served = Path(os.path.abspath(os.path.expanduser(model.path))).name if model.path else model.name
        model = dataclasses.replace(model, served_name=served or model.name)
    model = with_config_json(model)

    resolved = dataclasses.replace(run, device=device, low_bit=low_bit, model=model)
    return dataclasses.replace(resolved, engine=engine.resolve(resolved))
