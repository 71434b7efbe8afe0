"""The evaluation's metrics and readings on crafted answers, each against an independent computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from sklearn.metrics import average_precision_score

from ltu_jax import tiny_data
from ltu_jax.eval import choices, keywords, metrics, report, tasks

TOL = 1e-9


def test_wer_after_whisper_normaliser_counts_the_edits():
  # The normaliser drops the prefix, case and punctuation, expands "Mr." and reads "twenty five" as 25.
  assert metrics.transcript_words("Spoken text: Mr. Smith has twenty-five cats!") == ["mister", "smith", "has", "25", "cats"]
  assert metrics.word_error_rate(["Spoken text: The cat, sat!"], ["the cat sat"]) == 0.0
  # "a x c" vs "a b c": 1 substitution; "d e f g" vs "d e": 2 insertions; "h" vs "h i j": 2 deletions.
  # 5 edits over 3 + 2 + 3 = 8 reference words, pooled over the corpus (not the mean of the three rates).
  wer = metrics.word_error_rate(["a x c", "d e f g", "h"], ["a b c", "d e", "h i j"])
  assert abs(wer - 100 * 5 / 8) < TOL
  assert metrics.word_error_rate(["", "x"], ["a b", "x"]) == 100 * 2 / 3
  assert metrics.word_error_rate(["anything"], [""]) is None


def test_map_matches_scikit_learn():
  rng = np.random.default_rng(0)
  truth = rng.random((40, 6)) < 0.3
  truth[:, 5] = False  # a class without positives is left out, as sklearn's macro average of present classes
  scores = rng.random((40, 6)).round(1)  # rounded: ties, which both must treat as one threshold
  present = truth.any(axis=0)
  expected = average_precision_score(truth[:, present], scores[:, present], average="macro")
  assert abs(metrics.mean_average_precision(scores, truth) - 100 * expected) < 1e-9
  for c in np.flatnonzero(present):
    assert abs(metrics.average_precision(scores[:, c], truth[:, c]) - average_precision_score(truth[:, c], scores[:, c])) < TOL
  assert abs(metrics.chance_map(truth) - 100 * truth[:, present].mean(axis=0).mean()) < TOL


def test_caption_metrics_are_pycocoevalcaps_on_python_tokens():
  predictions = ["A dog barks, loudly!", "Rain falls on a roof.", "a car passes by"]
  references = [["a dog is barking loudly", "dog barks"], ["rain falling on a tin roof"], ["a car drives past", "a car passes"]]
  # tokenised by hand: lowercase, punctuation dropped
  results = {0: ["a dog barks loudly"], 1: ["rain falls on a roof"], 2: ["a car passes by"]}
  truths = dict(enumerate(references))
  scores = metrics.caption_scores(predictions, references)
  assert set(scores) == {"CIDEr-D", "BLEU-4", "ROUGE-L"}
  assert abs(scores["CIDEr-D"] - 100 * Cider().compute_score(truths, results)[0]) < TOL
  assert abs(scores["BLEU-4"] - 100 * Bleu(4).compute_score(truths, results, verbose=0)[0][3]) < TOL
  assert abs(scores["ROUGE-L"] - 100 * Rouge().compute_score(truths, results)[0]) < TOL
  assert metrics.caption_tokens("A dog's bark, LOUD.") == "a dogs bark loud"
  assert metrics.caption_scores(["a dog barks"], [["a dog barks"]])["ROUGE-L"] == 100.0


def test_age_reads_the_first_number_or_a_ranges_middle():
  assert metrics.first_number("The speaker is about 42 years old.") == 42
  assert metrics.first_number("Between 20-30.") == 25 and metrics.first_number("20 to 31") == 25.5
  assert metrics.first_number("Young.") is None
  records = [{"output": "45", "label": 40}, {"output": "30 years"}, {"output": "x", "label": 50}]
  score = tasks._age(records, ["The speaker is 45.", "Around 20-30.", "No idea."])
  # |45 - 40| and |25 - 30| over the two answers with a number; the third is counted unanswered
  assert score.metrics == {"MAE (years)": 5.0, "answers with an age %": pytest.approx(100 * 2 / 3)}
  assert score.chance == pytest.approx(np.mean(np.abs(np.array([40, 30, 50]) - 40)))


def test_gender_rule_and_macro_f1():
  assert metrics.gender_rule("The speaker is female.") == "female"  # contains "male" too
  assert metrics.gender_rule("Not male: female.") == "female"  # the original's rule: "female" wins
  assert metrics.gender_rule("A woman speaks.") == "male"  # the original reads anything else as male
  # truths f f m m, predictions f m m m: F1(f) = 2*1/(1+2), F1(m) = 2*2/(3+2)
  assert abs(metrics.macro_f1(["f", "f", "m", "m"], ["f", "m", "m", "m"]) - 100 * (2 / 3 + 4 / 5) / 2) < TOL


def test_keyword_reading_is_whole_words_and_synonyms():
  sounds = keywords.vocabulary(tiny_data.class_names()["sound"])
  assert keywords.named_classes("The sound of a bell.", sounds) == {"bell"}
  assert keywords.named_classes("Sirens and an engine.", sounds) == {"siren", "engine hum"}
  assert keywords.named_classes("A bellow, a tapestry.", sounds) == set()  # not "bell", not "tap"
  speed = keywords.vocabulary(["slow", "normal", "fast"])
  assert keywords.parse_class("The speaker talks quickly.", speed) == "fast"
  assert keywords.parse_class("Neither slow nor fast.", speed) is None


@pytest.mark.parametrize(
  "answer, expected",
  [("B", 1), ("(C)", 2), ("b) fast", 1), ("C. normal", 2), ("A: slow", 0), ("The speech is fast.", 1),
   ("A fast talker.", 1), ("It is FAST", 1), ("slow or fast", None), ("D", None), ("quick", None)],
)
def test_choice_by_letter_then_text(answer, expected):
  assert choices.exact_choice(answer, ["slow", "fast", "normal"]) == expected


def test_choice_falls_back_to_embedding(embedder):
  options = [["a dog barking", "rain", "a car engine"], ["male", "female"]]
  picked, exact = choices.choose(["Woof woof, a puppy!", "B"], options, embedder)
  assert picked == [0, 1] and exact == [False, True]


def test_mmau_and_air_bench_items_become_records(tmp_path):
  (tmp_path / "clips").mkdir()
  (tmp_path / "clips" / "a.wav").write_bytes(b"")
  mmau = [{"id": "q1", "audio_id": "./test-mini-audios/a.wav", "question": "Which?", "choices": ["x", "y"],
           "answer": "y", "task": "sound"}]
  records, bad = choices.records("m.json", mmau, str(tmp_path / "clips"))
  assert bad == [] and records[0]["audio_id"] == str(tmp_path / "clips" / "a.wav")  # found by file name
  assert records[0]["instruction"] == "Which? Choose one: (A) x (B) y." and records[0]["output"] == "y"
  air = [{"uniq_id": 7, "path": "a.wav", "question": "Q?", "choice_a": "p", "choice_b": "q", "choice_c": "r",
          "choice_d": "s", "answer_gt": "r", "task_name": "Speaker_Gender", "dataset_name": "VoxCeleb1"}]
  records, _ = choices.records("air.json", air, str(tmp_path))
  assert records[0]["audio_id"] == str(tmp_path / "Speaker_Gender_VoxCeleb1" / "a.wav")
  assert records[0]["choices"] == ["p", "q", "r", "s"] and records[0]["task"] == "Speaker_Gender"
  wrong = [{**mmau[0], "answer": "z"}]
  with pytest.raises(ValueError, match=r"m.json: item 0: the answer 'z' is not one of the choices"):
    choices.records("m.json", wrong, None)
  assert choices.records("m.json", wrong + mmau, None, skip_bad=True)[1] == [("m.json: item 0", "the answer 'z' is not one of the choices ['x', 'y']")]


def test_protocols_come_from_the_data():
  assert tasks.protocol("asr", [{}]) == "asr" and tasks.protocol("AudioCaps caption", [{}]) == "caption"
  assert tasks.protocol("emotion", [{"label": "happy"}]) == "classification"
  assert tasks.protocol("events", [{"label": ["dog", "rain"]}]) == "multi-label"
  assert tasks.protocol("music", [{"choices": ["a", "b"]}]) == "multiple choice"
  assert tasks.protocol("chat", [{}]) == "open-ended"
  assert tasks.protocol("chat", [{}], tasks.TaskLabels("caption")) == "caption"


def test_label_file_gives_the_classes_and_is_checked(tmp_path):
  path = tmp_path / "labels.json"
  path.write_text(json.dumps({"emotion": ["happy", "sad", "angry"], "clips": {"protocol": "caption"}}))
  labels = tasks.read_labels(path)
  assert labels["emotion"].labels == ("happy", "sad", "angry") and labels["clips"].protocol == "caption"
  assert tasks.class_names("emotion", ["sad"], labels["emotion"]) == ["happy", "sad", "angry"]
  with pytest.raises(ValueError, match=r"task 'emotion': labels \['bored'\] are not in the label file"):
    tasks.class_names("emotion", ["bored"], labels["emotion"])
  path.write_text(json.dumps({"emotion": {"protocol": "vibes"}}))
  with pytest.raises(ValueError, match=r"labels.json: task 'emotion': unknown protocol 'vibes'"):
    tasks.read_labels(path)


def test_both_readings_on_the_tiny_records(embedder):
  clips = tiny_data.plan_clips(0, 0, 12)
  records = [r for clip in clips for r in tiny_data.records(clip, f"/{clip.file_name}", None, None)]
  labels = {task: tasks.TaskLabels(None, tuple(names)) for task, names in tiny_data.class_names().items()}
  perfect = tasks.score(records, [r["output"] for r in records], embedder, labels)
  assert [s.protocol for s in perfect.values()] == ["asr", "gender", "classification", "classification", "multi-label", "open-ended"]
  assert perfect["asr"].metrics == {"WER %": 0.0}
  for task in ("gender", "speed", "pitch", "sound"):
    keyword = "accuracy (rule) %" if task == "gender" else "accuracy (keywords) %"
    assert perfect[task].metrics[keyword] == 100.0 and perfect[task].chance < 100.0, task
  assert perfect["sound"].metrics["mAP (embedding) %"] == 100.0
  assert perfect["open-ended question"].metrics["agreement (keywords) %"] == 100.0
  assert perfect["open-ended question"].metrics["similarity (embedding) %"] == pytest.approx(100.0, abs=1e-3)
  # the label names alone, as an answer, are read right by the embedding
  named = [", ".join(r["label"]) if isinstance(r.get("label"), list) else r.get("label", r["output"]) for r in records]
  by_name = tasks.score(records, named, embedder, labels)
  assert all(by_name[t].metrics["accuracy (embedding) %"] == 100.0 for t in ("gender", "speed", "pitch", "sound"))
  # a sound answer naming one extra sound: wrong for the keywords (the set differs), still ranked by mAP
  extra = tasks.score(records, [r["output"] + " And a whistle." if r["task"] == "sound" else r["output"] for r in records], embedder, labels)
  sounds = [r["label"] for r in records if r["task"] == "sound"]
  assert extra["sound"].metrics["accuracy (keywords) %"] == pytest.approx(100 * sum("whistle" in s for s in sounds) / len(sounds))
  empty = tasks.score(records, [""] * len(records), embedder, labels)
  assert empty["asr"].metrics["WER %"] == 100.0 and empty["speed"].metrics["accuracy (keywords) %"] == 0.0


def test_reports_list_every_metric_before_and_after():
  before = {"gender": tasks.TaskScore("gender", 10, {"accuracy (rule) %": 50.0, "F1 (rule) %": 40.0}, 60.0)}
  after = {"gender": tasks.TaskScore("gender", 10, {"accuracy (rule) %": 90.0, "F1 (rule) %": 85.5}, 60.0),
           "asr": tasks.TaskScore("asr", 4, {"WER %": 5.0}, 100.0)}
  rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in report.compare(before, after).splitlines()]
  assert rows[0] == ["task", "n", "metric", "before", "after", "chance"]
  assert rows[2:] == [
    ["gender", "10", "accuracy (rule) %", "50.0", "90.0", "60.0"], ["", "", "F1 (rule) %", "40.0", "85.5", ""],
    ["asr", "4", "WER %", "-", "5.0", "100.0"],
  ]
  table = [[c.strip() for c in line.strip("|").split("|")] for line in report.table(after).splitlines()]
  assert table[2] == ["gender", "gender", "10", "accuracy (rule) %", "90.0", "60.0"]
