"""Evaluation: in-domain accuracy by the paper's protocols, forgetting through lm-eval (offline), weight-space metrics.

    protocols.py   prompts, answer extraction and judging (LLM-Adapters, MetaMath, MATH)
    generation.py  batched greedy generation and log-likelihood scoring, sharded over ranks
    choice.py      multiple-choice accuracy by log-likelihood (in training, and lm-eval's clora_mc)
    harness.py     lm-evaluation-harness glue and the local-file task templates (lm_eval_tasks/)
    weights.py     ‖ΔW‖_F, ‖ΔW‖_2, F = mean ‖ΔW·x‖/‖x‖, subspace leakage
    run.py         one evaluation of a base model and its adapters (launch/evaluate.py), checked before loading
    report.py      eval_results.json / .md and the sweep plot
"""
