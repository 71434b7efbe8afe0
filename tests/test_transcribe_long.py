"""Transcription of any length (`ltu_jax.transcribe`): the window layout and the merge of windows' ids on
crafted inputs, then real tiny.en on a 70 s and a 25 s espeak-ng recording."""

from __future__ import annotations

import difflib

import numpy as np
import pytest
import soundfile as sf

from ltu_jax import audio, frontend, transcribe
from ltu_jax.eval.metrics import transcript_words, word_error_rate
from tests.helpers import LONG_SPEECH, espeak_speech, recording

SAMPLE_RATE = audio.SAMPLE_RATE
# tiny.en reads these sentences one at a time with 10% word errors (the first 16; its own hearing of the
# synthetic voices), and the 70 s recording long-form with 9%. A lost sentence adds about 6 points over the
# 16, and hard cuts every 20 s (no move to a pause) gave 38%: 15% passes the model's own errors and fails a
# lost sentence.
LONG_FORM_WER = 15.0
# A sentence counts as present when this share of its words is matched, in order, in the transcript.
SENTENCE_FOUND = 0.6
LONG_SENTENCES, SHORT_SENTENCES = 16, 6  # about 70 s and 25 s


def test_short_waveform_is_one_window():
  waveform = np.ones(frontend.WHISPER_SAMPLES, np.float32)
  assert transcribe.window_bounds(waveform) == [(0, frontend.WHISPER_SAMPLES)]
  assert transcribe.window_bounds(waveform[:123]) == [(0, 123)]


def test_windows_overlap_and_cut_at_pauses():
  """Noise with 0.1 s of silence at known points: every cut lands in a silence, 20 s apart as near as allowed."""
  seconds = 70
  waveform = np.random.default_rng(0).uniform(-1, 1, seconds * SAMPLE_RATE).astype(np.float32)
  pauses = (19.0, 28.5, 38.0, 48.0, 57.0, 67.0)
  for pause in pauses:
    waveform[int(pause * SAMPLE_RATE) : int((pause + 0.1) * SAMPLE_RATE)] = 0
  bounds = transcribe.window_bounds(waveform)
  assert bounds[0][0] == 0 and bounds[-1][1] == len(waveform)
  cuts = sorted([start for start, _ in bounds[1:]] + [stop for _, stop in bounds[:-1]])
  assert len(cuts) == len(pauses)
  for cut, pause in zip(cuts, pauses):
    assert pause * SAMPLE_RATE <= cut < (pause + 0.1) * SAMPLE_RATE, (cut / SAMPLE_RATE, pause)
  for (start, stop), (next_start, _) in zip(bounds, bounds[1:]):
    assert stop - start <= frontend.WHISPER_SAMPLES and next_start < stop  # each window overlaps the next


def test_join_at_the_agreeing_run():
  assert transcribe.join_overlapping([1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 9]) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
  # A word cut at either window's edge (99, 77) is dropped: left before the run, right after it.
  assert transcribe.join_overlapping([1, 2, 3, 4, 5, 6, 99], [77, 4, 5, 6, 7, 8]) == [1, 2, 3, 4, 5, 6, 7, 8]
  # The longest run wins over a shorter one at another alignment ([5, 6] facing [5, 6] at shift 0).
  assert transcribe.join_overlapping([5, 6, 0, 0, 1, 2, 3], [5, 6, 9, 1, 2, 3, 4]) == [5, 6, 0, 0, 1, 2, 3, 4]


def test_right_window_that_stops_early_keeps_left():
  assert transcribe.join_overlapping([1, 2, 3, 4, 5, 6], [3, 4]) == [1, 2, 3, 4, 5, 6]


def test_no_overlap_concatenates():
  assert transcribe.join_overlapping([1, 2, 3], [4, 5, 6]) == [1, 2, 3, 4, 5, 6]
  # One shared id is as likely chance (" the", "."): not a join.
  assert transcribe.join_overlapping([1, 2, 3], [3, 4]) == [1, 2, 3, 3, 4]


def test_empty_window_merges_to_the_others():
  assert transcribe.merge_windows([[1, 2, 3], [], [2, 3, 4]]) == [1, 2, 3, 4]
  assert transcribe.merge_windows([[], [4, 5]]) == [4, 5]
  assert transcribe.merge_windows([[7]]) == [7]
  assert transcribe.merge_windows([]) == []


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> list[np.ndarray]:
  return espeak_speech(LONG_SPEECH[:LONG_SENTENCES], tmp_path_factory.mktemp("long_speech"))


def sentences_found(transcript: str, sentences: list[str]) -> list[float]:
  """Per sentence, the share of its words that one in-order alignment of the whole text matches."""
  words = [transcript_words(sentence) for sentence in sentences]
  reference = [word for sentence in words for word in sentence]
  matcher = difflib.SequenceMatcher(a=reference, b=transcript_words(transcript), autojunk=False)
  matched = np.zeros(len(reference), bool)
  for block in matcher.get_matching_blocks():
    matched[block.a : block.a + block.size] = True
  ends = np.cumsum([len(sentence) for sentence in words])
  return [float(part.mean()) for part in np.split(matched, ends[:-1])]


@pytest.mark.slow
def test_long_and_short_recordings_transcribe_whole(tiny_en, tiny_en_folder, sentences, tmp_path, capsys):
  """The command line with `--batch-size 2`: the 70 s file's windows and the 25 s file's one are decoded two at
  a time across files; each transcript holds every sentence, in order, once."""
  texts = {count: " ".join(text for _, _, text in LONG_SPEECH[:count]) for count in (LONG_SENTENCES, SHORT_SENTENCES)}
  paths = {count: tmp_path / f"{count}_sentences.wav" for count in texts}
  for count, path in paths.items():
    sf.write(path, recording(sentences[:count]), SAMPLE_RATE, subtype="FLOAT")  # the samples exactly
  waveforms = {count: audio.load_audio(path) for count, path in paths.items()}
  assert len(transcribe.window_bounds(waveforms[LONG_SENTENCES])) > 2
  assert len(transcribe.window_bounds(waveforms[SHORT_SENTENCES])) == 1
  assert transcribe.main(["--model", tiny_en_folder, "--batch-size", "2", *map(str, paths.values())]) == 0
  lines = capsys.readouterr().out.splitlines()
  for (count, reference), path, line in zip(texts.items(), paths.values(), lines, strict=True):
    named, text = line.split("\t")
    assert named == str(path)
    found = sentences_found(text, [text for _, _, text in LONG_SPEECH[:count]])
    assert min(found) >= SENTENCE_FOUND, (count, found, text)
    # Nothing repeated: the transcript is not much longer than what was said.
    assert len(transcript_words(text)) <= 1.1 * len(transcript_words(reference)), text
    assert (wer := word_error_rate([text], [reference])) <= LONG_FORM_WER, (count, wer, text)
  # A clip of at most 30 s decodes exactly as it did before long-form (its window is last, in a batch alone).
  ids = transcribe.greedy_tokens(tiny_en, [waveforms[SHORT_SENTENCES]])[0]
  assert text == tiny_en.tokenizer.decode(ids, skip_special_tokens=True).strip()
