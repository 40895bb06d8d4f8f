"""Functions tests run in a fresh interpreter (vLLM needs one)."""


def vllm_generate(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    from bench import models
    from bench.generation import Sampling, VLLMGenerator

    gen = VLLMGenerator(models.resolve(model_dir), dtype="float32", max_model_len=256)
    return gen.generate(prompts, Sampling(max_new_tokens=max_new_tokens))
