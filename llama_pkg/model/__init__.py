"""The model: the Llama forward (llama.py), its attention kernels (attention.py), the one sampler
(sampler.py), GPTQ unpacking (gptq.py) and ExLlamaV2's GPTQ kernels behind its Linear (exllama_linear.py).
Only the engine and the backends import this package: it is where torch and CUDA code live."""
