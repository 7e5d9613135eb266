"""Thin entry points in front of FastChat's own servers (engine=fastchat), for what their command lines cannot
say: `api_server` (the API key from the environment), `ipex_llm_worker` (ipex-llm's worker on checkpoints
whose path contains "llama" but that ship no sentencepiece model). Each then runs the real module as
`python -m` would."""
