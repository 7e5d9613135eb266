"""How a pipeline's decoder layers are cut into stages: one rule for the launcher and the worker.

The launcher uses it to check each stage's memory before anything starts; the pipeline worker uses it to
decide which layers each rank loads. Both must agree, or the memory check would judge a split that never
runs. Standard library only, like `protocol.py`: the launcher has no torch, the ipex-llm venv no Hydra.

    split_layers(7, 3)                          -> [3, 2, 2]   by count: earlier stages take the remainder
    split_layers(4, 2, [1, 1, 1, 1], first_extra=2) -> [1, 3]  by bytes: the embedding weighs on stage 0
"""

from __future__ import annotations

from collections.abc import Sequence


def split_layers(
    num_layers: int,
    stages: int,
    layer_bytes: Sequence[int] | None = None,
    first_extra: int = 0,
    last_extra: int = 0,
) -> list[int]:
    """Decoder layers per stage, in stage order; every stage holds at least one layer.

    Without `layer_bytes`: by count, the first `num_layers % stages` stages one layer more (7 over 3 ->
    3, 2, 2). With `layer_bytes` (one figure per layer): contiguous stages whose largest total is as small as
    possible, a stage's total being its layers' bytes plus `first_extra` on the first stage (the embedding)
    and `last_extra` on the last (final norm and LM head); among equally good splits, earlier stages take
    more layers, so uniform layers without extras split as by count.
    """
    if stages < 1:
        raise ValueError(f"a pipeline needs at least one stage, got {stages}")
    if num_layers < stages:
        raise ValueError(f"{num_layers} layers cannot fill {stages} stages of at least one layer each")
    if layer_bytes is None:
        base, extra = divmod(num_layers, stages)
        return [base + (1 if stage < extra else 0) for stage in range(stages)]
    if len(layer_bytes) != num_layers:
        raise ValueError(f"layer_bytes has {len(layer_bytes)} entries for {num_layers} layers")
    if any(b < 0 for b in layer_bytes) or first_extra < 0 or last_extra < 0:
        raise ValueError("byte counts cannot be negative")
    return _balanced(list(layer_bytes), stages, first_extra, last_extra)


def stage_bounds(split: Sequence[int]) -> list[tuple[int, int]]:
    """[3, 2, 2] -> [(0, 3), (3, 5), (5, 7)]: each stage's first layer and one past its last."""
    bounds, start = [], 0
    for count in split:
        bounds.append((start, start + count))
        start += count
    return bounds


def _balanced(layer_bytes: list[int], stages: int, first_extra: int, last_extra: int) -> list[int]:
    n = len(layer_bytes)
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(stage: int, start: int, end: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == stages - 1 else 0)
        return prefix[end] - prefix[start] + extra

    # best[s][i]: the smallest largest-stage total for layers i.. split into stages s.. (stages - s of them).
    inf = float("inf")
    best: list[list[float]] = [[inf] * (n + 1) for _ in range(stages + 1)]
    best[stages][n] = 0
    for s in range(stages - 1, -1, -1):
        remaining = stages - s
        for i in range(n - remaining, -1, -1):
            # Stage s takes layers i..j-1 and leaves at least one layer to each later stage.
            best[s][i] = min(
                max(cost(s, i, j), best[s + 1][j]) for j in range(i + 1, n - (remaining - 1) + 1)
            )
    split, start = [], 0
    for s in range(stages):
        remaining = stages - s
        target = best[s][start]
        # The longest first stage that still reaches the optimum: earlier stages take more.
        end = max(
            j
            for j in range(start + 1, n - (remaining - 1) + 1)
            if max(cost(s, start, j), best[s + 1][j]) == target
        )
        split.append(end - start)
        start = end
    return split
