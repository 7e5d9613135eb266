"""A sweeper for benchmark grids.

It is Hydra's basic sweeper (Cartesian product, batches for the launcher) with two changes:

- Linked axes: `hydra.sweeper.link=[[engine.max_num_seqs,benchmark.concurrency]]` sweeps those keys together
  (zip) instead of crossing them. Linked axes must have the same number of values.
- Load axes (`benchmark.concurrency`, `benchmark.request_rate` unless linked) do not make separate jobs: a
  sweep over them becomes one list-valued override, so every load level runs against one server, in order.

The multirun.yaml it writes shows secrets (`engine.api_key=...`) as ***, as every file a run writes does.
"""

# No `from __future__ import annotations` here: Hydra executes plugin modules without registering them in
# sys.modules, and dataclasses cannot resolve string annotations then.
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig

LOAD_KEYS = ("benchmark.concurrency", "benchmark.request_rate")


@dataclass
class LlmstackSweeperConf:
    _target_: str = "hydra_plugins.llmstack_sweeper.sweeper.LlmstackSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045 (OmegaConf rejects PEP 604 unions)
    params: Optional[dict[str, str]] = None  # noqa: UP045
    link: list[list[str]] = field(default_factory=list)
    load_keys: list[str] = field(default_factory=lambda: list(LOAD_KEYS))


ConfigStore.instance().store(
    group="hydra/sweeper", name="llmstack", node=LlmstackSweeperConf, provider="llmstack"
)


class LlmstackSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: Optional[int],  # noqa: UP045
        params: Optional[dict[str, str]] = None,  # noqa: UP045
        link: Any = (),
        load_keys: Any = LOAD_KEYS,
    ) -> None:
        super().__init__(max_batch_size, params)
        self.link = [list(group) for group in link]
        self.load_keys = set(load_keys)

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        # The launcher keeps the real config; ours serves for multirun.yaml, the sweep directory and the
        # jobs' validation only.
        from llmstack.config.secrets import masked_sweep_config

        self.config = masked_sweep_config(config)

    def split_arguments(
        self,
        overrides: list[Override],
        max_batch_size: Optional[int],  # noqa: UP045
    ) -> list[list[list[str]]]:
        jobs = grid_jobs(overrides, self.link, self.load_keys)
        if max_batch_size is None:
            return [jobs]
        return [jobs[i : i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]


def grid_jobs(overrides: list[Override], link: list[list[str]], load_keys: set[str]) -> list[list[str]]:
    """The override list of every job, in a stable order."""
    linked = {key for group in link for key in group}
    axes: OrderedDict[str, list[str]] = OrderedDict()
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            value = override.get_value_element_as_str()
            if key.lstrip("+~") in load_keys and not isinstance(override.value(), list):
                value = f"[{value}]"  # one load level is a list of one
            axes[key] = [f"{key}={value}"]
            continue
        if not override.is_discrete_sweep():
            raise HydraException(f"llmstack's sweeper sweeps lists of values only, not {override.input_line}")
        values = list(override.sweep_string_iterator())
        bare = key.lstrip("+~")
        if bare in load_keys and bare not in linked:
            axes[key] = [f"{key}=[{','.join(values)}]"]
        elif bare in load_keys:
            axes[key] = [f"{key}=[{value}]" for value in values]
        else:
            axes[key] = [f"{key}={value}" for value in values]

    factors: list[list[list[str]]] = []
    used: set[str] = set()
    for group in link:
        present = {key: axes[k] for k in axes if (key := k.lstrip("+~")) in group}
        missing = [key for key in group if key not in present]
        if missing:
            raise HydraException(f"hydra.sweeper.link names {missing}, which the command line does not sweep")
        lengths = {key: len(values) for key, values in present.items()}
        if len(set(lengths.values())) != 1:
            raise HydraException(f"linked axes must have as many values each: {lengths}")
        count = next(iter(lengths.values()))
        factors.append([[values[i] for values in present.values()] for i in range(count)])
        used.update(k for k in axes if k.lstrip("+~") in group)
    for key, values in axes.items():
        if key not in used:
            factors.append([[value] for value in values])
    return [list(itertools.chain.from_iterable(combo)) for combo in itertools.product(*factors)]
