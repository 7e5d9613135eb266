"""llmstack's pipeline-parallel worker: a model's decoder layers split across ranks under torchrun.

    python -m llmstack.workers.pipeline.torchrun --standalone --nnodes=1 --nproc-per-node=2 \\
        -m llmstack.workers.pipeline --model DIR --served-model-name NAME --pipeline-parallel-size 2

Rank 0 serves the lightweight worker's HTTP API, from the same code (`workers/lightweight.serve`): its
model process (`head.py`) runs stage 0 and the scheduler (`scheduler.py`: continuous batching inside each
micro-batch, several micro-batches in flight). Ranks 1..N-1 (`ranks.py`) run their layers (`stage.py`,
loaded alone from the checkpoint: `weights.py`) on what the previous rank sends (`transport.py`). The
launcher's side is `llmstack/engines/pp.py`; the flags are `protocol.PipelineOptions`.
"""
