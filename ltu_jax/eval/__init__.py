"""Evaluation: the papers' protocols on LTU data files and multiple-choice benchmarks.

    tasks.py      which protocol a task gets, its labels, its scores
    metrics.py    WER, mAP, MAE, F1, caption metrics: pure functions
    embedding.py  the sentence embedder that reads answers as labels
    keywords.py   the keyword reading, the second one beside the embedding's
    choices.py    MMAU / AIR-Bench multiple-choice files and choice matching
    report.py     Markdown and JSON summaries, the bar chart
    run.py        answering (batched, resumable) and the command line (`python -m ltu_jax.eval`)
"""

from ltu_jax.eval.report import compare, table
from ltu_jax.eval.run import evaluate, main, parser
from ltu_jax.eval.tasks import TaskScore, score

__all__ = ["TaskScore", "compare", "evaluate", "main", "parser", "score", "table"]
