"""Serving Recursive Transformers: a decoding engine that runs tokens at different loop depths in
one call of the shared block (continuous depth-wise batching), the static / CSB / CDB schedulers,
the throughput simulator fed by measured latency tables, and the serving benchmark's jobs.

Entry points: ``engine.DepthBatchedModel``, ``backend.serve``, ``scheduler.run_schedule``,
``simulator.simulate``, ``latency.measure_tables``, ``paper.paper_estimate``,
``quality.early_exit_logits``, ``jobs.execute_early_exit`` / ``jobs.execute_serving``
(docs/serving.md). Early-exit training and the exit rules live in ``recursive/early_exit.py``.
"""
