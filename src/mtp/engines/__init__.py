"""Real serving engines, run by the project: llama.cpp (:mod:`mtp.engines.llamacpp`) and vLLM
(:mod:`mtp.engines.vllm`); the target model files they serve (:mod:`mtp.engines.targets`); and
``mtp bench engine`` (:mod:`mtp.bench.engine`), which times them against their own plain decoding."""
