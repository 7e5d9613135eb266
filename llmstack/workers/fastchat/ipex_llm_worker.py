"""ipex-llm's FastChat worker, loading the tokenizer the checkpoint has.

    python -m llmstack.workers.fastchat.ipex_llm_worker [ipex_llm.serving.fastchat.ipex_llm_worker's options]

ipex-llm's loader (`ipex_llm.transformers.loader.get_tokenizer_cls`) picks the slow sentencepiece
`LlamaTokenizer` whenever the model's *path* contains "llama", "vicuna" or "merged-baize", anywhere in it
(a parent folder named llama-models is enough). Checkpoints with only a tokenizer.json (Llama 3 and later,
most fine-tunes, llmstack's tiny model) then fail to load with "Either model_file or model_proto must be
specified". Here that choice falls back to AutoTokenizer when the folder has no tokenizer.model; everything
else is ipex-llm's worker unchanged.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

WORKER_MODULE = "ipex_llm.serving.fastchat.ipex_llm_worker"
SENTENCEPIECE_FILE = "tokenizer.model"


def main() -> None:
    from ipex_llm.transformers import loader

    by_path = loader.get_tokenizer_cls

    def tokenizer_cls(model_path: str) -> type:
        chosen = by_path(model_path)
        if chosen is loader.LlamaTokenizer and not (Path(model_path) / SENTENCEPIECE_FILE).is_file():
            return loader.AutoTokenizer
        return chosen

    loader.get_tokenizer_cls = tokenizer_cls
    sys.argv[0] = WORKER_MODULE
    runpy.run_module(WORKER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
