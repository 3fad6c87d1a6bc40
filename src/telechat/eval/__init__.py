"""Evaluation harness: `telechat eval` (the TeleChat benchmark table) and its parts.

    from telechat.eval import EvalConfig, evaluate
    report = evaluate(telechat.load("default"), EvalConfig(tasks=["mmlu"], data_dir="data/eval", limit=20))
"""
from .data import DataError, Item
from .loglik import LoglikEngine, rolling_windows
from .runner import EvalConfig, evaluate, markdown_table, run_task, write_report
from .tasks import TASKS, get_task

__all__ = ["EvalConfig", "evaluate", "run_task", "markdown_table", "write_report", "LoglikEngine",
           "rolling_windows", "TASKS", "get_task", "DataError", "Item"]
