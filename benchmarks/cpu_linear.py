"""oneDNN's packed linear against F.linear on CPU, float32, one thread, side by side (`layers.pack_linears`).

For each width (a Llama-family layer's four projections: qkv 3h x h, o h x h, gate/up 2i x h, down h x i, with
i = 2.75 h), and each number of rows (decode batches, a prefill), the time of one pass through 4 such layers,
F.linear and packed interleaved (5 alternations, the median of each), and the ratio. What it tells: the width
from which packing pays (`_PACK_MIN_WIDTH`), and how much a decode step gains.

    .venv/bin/python benchmarks/cpu_linear.py            # about a minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch
    import torch.nn.functional as F

    from llmstack.workers.backends.layers import linear

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64, 512])
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reorder = torch.ops.mkldnn._reorder_linear_weight
    print(f"torch {torch.__version__}, 1 thread; ms per pass through {args.layers} layers' projections")
    print("| width | rows | F.linear ms | packed ms | F.linear / packed |")
    print("|---:|---:|---:|---:|---:|")
    for h in args.widths:
        i = int(h * 2.75)
        shapes = [(3 * h, h), (h, h), (2 * i, h), (h, i)]
        plain = [[torch.randn(*s) * 0.02 for s in shapes] for _ in range(args.layers)]
        packed = [[reorder(w, 16) for w in layer] for layer in plain]
        for rows in args.rows:
            x, xi = torch.randn(rows, h), torch.randn(rows, i)

            def one_pass(weights: list[list[torch.Tensor]], fn, x=x, xi=xi) -> float:
                start = time.perf_counter()
                for qkv, o, gate_up, down in weights:
                    fn(x, qkv, None), fn(x, o, None), fn(x, gate_up, None), fn(xi, down, None)
                return time.perf_counter() - start

            reps = max(3, int(2000 / rows / max(1, h // 256)))
            times: dict[str, list[float]] = {"plain": [], "packed": []}
            for _ in range(5):  # interleaved: the machine's noise lands on both
                for name, weights, fn in (("plain", plain, F.linear), ("packed", packed, linear)):
                    one_pass(weights, fn)  # warm
                    times[name].append(min(one_pass(weights, fn) for _ in range(reps)) * 1e3)
            a, b = statistics.median(times["plain"]), statistics.median(times["packed"])
            print(f"| {h} | {rows} | {a:.3f} | {b:.3f} | {a / b:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
