"""The benchmark phases: the glue between a RunConfig, the benchmark client (`llmstack.bench`) and the run
directory. Each phase module holds its config dataclass (`CONFIG`), its rules (`problems`, `host_problems`)
and its code (`prepare`); `registry` lists them, `runner` is the loop the HTTP phases share.

Nothing is imported here: `offline_process` runs under the engine's interpreter, which may lack llmstack's
dependencies.
"""
