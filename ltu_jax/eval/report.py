"""Scores as people read them: a Markdown table per run (or before/after), a JSON summary, a bar chart."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from ltu_jax.eval.tasks import TaskScore


def _number(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table padded to line up in a terminal too; numbers (all but the first text columns) right-aligned."""
  widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
  numeric = [all(_is_number(row[c]) for row in rows) for c in range(len(header))]

  def line(cells):
    return "| " + " | ".join(cell.rjust(w) if n else cell.ljust(w) for cell, w, n in zip(cells, widths, numeric)) + " |"

  rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
  return "\n".join([line(header), rule, *map(line, rows)])


def _is_number(cell: str) -> bool:
  return cell in ("", "-") or cell.replace(".", "", 1).lstrip("-").isdigit()


def table(scores: dict[str, TaskScore]) -> str:
  """Rows: each task's metrics, the headline first with its chance level."""
  rows = []
  for task, score in scores.items():
    for index, (metric, value) in enumerate(score.metrics.items()):
      first = index == 0
      rows.append([
        task if first else "", score.protocol if first else "", str(score.n) if first else "", metric, _number(value),
        _number(score.chance) if first else "",
      ])
  return _markdown(["task", "protocol", "n", "metric", "score", "chance"], rows)


def compare(before: dict[str, TaskScore], after: dict[str, TaskScore]) -> str:
  """A before/after table (e.g. the untrained and the trained model on one test set)."""
  rows = []
  for task in dict.fromkeys([*before, *after]):
    first, second = before.get(task), after.get(task)
    known = first or second
    for index, metric in enumerate(dict.fromkeys([*(first.metrics if first else {}), *(second.metrics if second else {})])):
      values = [s.metrics.get(metric) if s else None for s in (first, second)]
      rows.append([
        task if index == 0 else "", str(known.n) if index == 0 else "", metric, *map(_number, values),
        _number(known.chance) if index == 0 else "",
      ])
  return _markdown(["task", "n", "metric", "before", "after", "chance"], rows)


def summary(scores: dict[str, TaskScore], **about: Any) -> dict[str, Any]:
  """The JSON summary: `about` (model, data, left out items, ...) and each task's scores."""
  tasks = {task: {"protocol": s.protocol, "n": s.n, "metrics": s.metrics, "chance": s.chance} for task, s in scores.items()}
  return {**about, "tasks": tasks}


def chart(scores: dict[str, TaskScore], path: str | os.PathLike, title: str) -> None:
  """A horizontal bar per task: its headline metric, labelled with the metric's name and value."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  tasks = list(scores)
  headlines = [scores[t].headline for t in tasks]
  figure = Figure(figsize=(8, 1.2 + 0.5 * len(tasks)))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  values = [value or 0.0 for _, value in headlines]
  bars = axes.barh(range(len(tasks)), values, color="tab:blue")
  axes.set_yticks(range(len(tasks)), [f"{t}\n{metric}" for t, (metric, _) in zip(tasks, headlines)], fontsize=8)
  axes.invert_yaxis()
  axes.bar_label(bars, [_number(value) for _, value in headlines], padding=3, fontsize=8)
  axes.set_xlim(0, max([100.0, *values]) * 1.1)
  axes.set_title(title, fontsize=9)
  figure.tight_layout()
  figure.savefig(path)


def write(out_dir: str, scores: dict[str, TaskScore], title: str, **about: Any) -> None:
  """`summary.md`, `summary.json` and `scores.png` in `out_dir`."""
  left_out = about.get("left_out") or []
  with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(f"# {title}\n\n{table(scores)}\n")
    if left_out:
      f.write(f"\nLeft out ({len(left_out)}):\n\n" + "".join(f"- {item}: {why}\n" for item, why in left_out))
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary(scores, title=title, **about), f, indent=1, ensure_ascii=False)
  chart(scores, os.path.join(out_dir, "scores.png"), title)
