"""A sweeper for benchmark grids.

It is Hydra's basic sweeper (Cartesian product, batches for the launcher) with two changes:

- Linked axes: `hydra.sweeper.link=[[engine.max_num_seqs,benchmark.concurrency]]` sweeps those keys together
  (zip) instead of crossing them. Linked axes must have the same number of values.
- Load axes (`benchmark.concurrency`, `benchmark.request_rate` unless linked) do not make separate jobs: a
  sweep over them becomes one list-valued override, so every load level runs against one server, in order.

- Every job is checked (composed, resolved, validated, planned; nothing started) before the first starts:
  all invalid jobs are reported at once and none starts, unless `hydra.sweeper.keep_going_on_invalid=true`
  (then they get failure.json and the valid ones run). The grid's directory, job list, report and exit
  status are llmstack.grid_sweep's; a dry run (`dry_run=true`) writes none of them.

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
from hydra.core.override_parser.overrides_parser import OverridesParser
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
    keep_going_on_invalid: bool = False


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
        keep_going_on_invalid: bool = False,
    ) -> None:
        super().__init__(max_batch_size, params)
        self.link = [list(group) for group in link]
        self.load_keys = set(load_keys)
        self.keep_going_on_invalid = keep_going_on_invalid

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        # The launcher keeps the real config; ours serves for multirun.yaml, the sweep directory and the
        # jobs' validation only.
        from llmstack.config.secrets import masked_sweep_config

        self.config = masked_sweep_config(config)

    def sweep(self, arguments: list[str]) -> Any:
        """BasicSweeper.sweep, with every job checked first and the grid's own directory and report."""
        from omegaconf import open_dict

        from llmstack import grid_sweep

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        jobs = grid_jobs(overrides, self.link, self.load_keys)
        plan = grid_sweep.plan_sweep(
            self.config,
            jobs,
            compose=lambda job: loader.load_sweep_config(master_config=self.config, sweep_overrides=job),
            launcher_target=str(self.config.hydra.launcher.get("_target_", "")),
        )
        if not grid_sweep.start(plan, self.config, self.keep_going_on_invalid):
            return []
        runnable = [plan.launch_overrides(job) for job in plan.runnable]
        # Launchers create their own config's sweep dir: make it the one the jobs write in.
        launcher_config = self.launcher.config  # type: ignore[attr-defined]
        with open_dict(launcher_config):
            launcher_config.hydra.sweep.dir = str(plan.launch_directory)
        self.overrides = self.split_arguments_of(runnable, self.max_batch_size)
        returns = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for r in results:
                _ = r.return_value  # a job's exception (a stop signal) ends the grid here
            initial_job_idx += len(batch)
            returns.append(results)
        grid_sweep.finish(plan)
        return returns

    @staticmethod
    def split_arguments_of(jobs: list[list[str]], max_batch_size: Optional[int]) -> list[list[list[str]]]:  # noqa: UP045
        if max_batch_size is None:
            return [jobs]
        return [jobs[i : i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]

    def split_arguments(
        self,
        overrides: list[Override],
        max_batch_size: Optional[int],  # noqa: UP045
    ) -> list[list[list[str]]]:
        return self.split_arguments_of(grid_jobs(overrides, self.link, self.load_keys), max_batch_size)


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
