"""A pipeline's stages, in process: two stages of the tiny model give the lightweight worker's logits.

Both attention paths (llmstack's C kernel, and torch's SDPA, which the stages use off float32 CPU: on GPUs)
over the packed steps the pipeline sends: prompts whole or in chunks at any start, decodes past the first
rounded decode width, a prefill and decodes in one step, sequences in any slots. Also on a model wide enough
for oneDNN's packed linears (384), which both the stages and the fused decoder then use.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmstack.models.tiny import Shape, ensure_tiny_model  # noqa: E402
from llmstack.workers.pipeline.stage import MIN_DECODE_WIDTH, StageModel  # noqa: E402
from llmstack.workers.pipeline.weights import load_config, load_stage  # noqa: E402

MAX_LEN = 256
TOLERANCE = 1e-5
SHAPES = {"tiny": Shape(), "wide": Shape(hidden_size=384, intermediate_size=768, num_attention_heads=6,
                                         num_key_value_heads=2)}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model_path(request: pytest.FixtureRequest) -> str:
    return str(ensure_tiny_model(shape=SHAPES[request.param]))


def pipeline(kernel: bool, path: str):
    config = load_config(path)
    cpu = torch.device("cpu")
    stages = []
    layers = config.num_hidden_layers
    for start, stop in ((0, 1), (1, layers)):
        weights = load_stage(path, config, start, stop, first=start == 0, last=stop == layers,
                             dtype=torch.float32, device=cpu, table_len=MAX_LEN)  # fmt: skip
        stage = StageModel(weights, slots=4, max_model_len=MAX_LEN)
        if not kernel:
            stage._attention = None  # torch's SDPA, as on a GPU
        stages.append(stage)

    def step(tokens: list[int], slots: list[int], starts: list[int], counts: list[int]) -> torch.Tensor:
        hidden = stages[0].forward(torch.tensor(tokens), slots, starts, counts)
        return stages[1].forward(hidden, slots, starts, counts)

    return step, stages[0]


@pytest.fixture(scope="module")
def reference(model_path: str):
    from llmstack.workers.backends.loader import load
    from llmstack.workers.protocol import WorkerOptions

    options = WorkerOptions(model=model_path, served_model_name="tiny", max_model_len=MAX_LEN,
                            max_batch_size=4, torch_threads=1)  # fmt: skip
    return load(options).backend


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "torch-sdpa"])
def test_two_stages_give_the_fused_decoders_logits(reference, model_path: str, kernel: bool) -> None:
    step, stage = pipeline(kernel, model_path)
    packed = "onednn-packed" if "-h384-" in model_path else "torch"  # the default tiny model is too narrow
    assert stage.linear == reference.info().extra["linear"] == packed
    first, second = list(range(5, 45)), [1, 7, 3]
    for seq_id in (0, 1):
        reference.release(seq_id)
    want = reference.prefill([0, 1], [first, second])
    # The long prompt in three chunks (starts 0, 16, 30) in slot 2, the short one whole in slot 0: the
    # last chunk and the short prompt share a step.
    step(first[:16], [2], [0], [16])
    step(first[16:30], [2], [16], [14])
    got = step(first[30:] + second, [2, 0], [30, 0], [10, 3])
    assert (got - want).abs().max().item() < TOLERANCE
    tokens = want.argmax(-1).tolist()
    # Decodes well past the first rounded width (positions beyond MIN_DECODE_WIDTH), both in one step.
    for _ in range(MIN_DECODE_WIDTH):
        want = reference.decode([0, 1], tokens)
        got = step(tokens, [2, 0], [len(first), len(second)], [1, 1])
        assert (got - want).abs().max().item() < TOLERANCE
        tokens = want.argmax(-1).tolist()
        first, second = [*first, tokens[0]], [*second, tokens[1]]
    for seq_id in (0, 1):
        reference.release(seq_id)
