"""The package's own batched engine, after nano-vllm: sequence.py (one request), scheduler.py (admit,
plan, post-process; no torch), block_manager.py (the KV block pool, prefix reuse), model_runner.py (the
device state and the step), cuda_graphs.py (decode steps as graphs), llm_engine.py (the loop, and the
backend protocol the pipeline calls)."""
