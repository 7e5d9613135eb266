"""Every rank's entry point (torchrun runs it once per rank): rank 0 serves HTTP, the others their stage."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llmstack.workers.protocol import PipelineOptions


def main(argv: Sequence[str] | None = None) -> int:
    from llmstack.workers.pipeline.ranks import configure_logging, world_and_rank

    options = PipelineOptions.parse(argv)
    _, rank, _ = world_and_rank()
    if rank == 0:
        from llmstack.workers.lightweight import serve
        from llmstack.workers.pipeline.head import main as model_main

        return serve(options, model_main=model_main)
    from llmstack.workers.pipeline.ranks import main as rank_main

    configure_logging(options.log_level)
    return rank_main(options, rank)


if __name__ == "__main__":
    from llmstack.workers.model_process import fast_exit

    sys.stdout.flush()
    fast_exit(main())
