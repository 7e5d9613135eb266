"""The servers llmstack owns. Each worker is a separate program (`python -m llmstack.workers.<name>`),
started through the same supervisor as vLLM. Workers import nothing from the launcher: only
`llmstack.workers.protocol`, the command line both sides agree on.
"""
