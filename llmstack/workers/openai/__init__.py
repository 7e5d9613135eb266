"""The worker's HTTP front end, split as vLLM's `entrypoints/openai`: `api_router` (routes), `protocol`
(request bodies and their sampling parameters), `serving` (the request logic), `sse` (streamed responses).
It serves OpenAI's routes and ipex-llm's /generate ones over the model loop's client.
"""
