"""Model backends behind one small contract (`base.Backend`); `loader` loads a model and picks one.

transformers + fast     `fast_llama`: batched prefill, CUDA-graph decode (Llama, Mistral, Qwen2)
transformers + fused    `fused`: llmstack's decoder over the checkpoint's weights (Llama, Mistral, Qwen2)
transformers + generic  `generic`: the model's own forward() (any causal LM)
ipex_llm (generic)      ipex-llm's low-bit model (load_in_low_bit), its own forward()

"""
