"""VALIDATE: every rule a run config must pass before anything starts, run from one place.

`rules.py` runs them: the config's own ranges, each engine's rules (beside the engine, `engines/`), each
benchmark phase's (beside the phase, `phases/`), and the host rules (ports, paths, interpreters), which
`dry_run=true` skips. `profile_engine.py` catches a per-GPU profile combined with an engine it was not
written for, before Hydra composes.
"""

from __future__ import annotations

from llmstack.validation.rules import (
    config_problems,
    host_problems,
    module_available,
    port_is_free,
    results_dir_problem,
    valid_low_bits,
    validate,
)

__all__ = [
    "config_problems",
    "host_problems",
    "module_available",
    "port_is_free",
    "results_dir_problem",
    "valid_low_bits",
    "validate",
]
