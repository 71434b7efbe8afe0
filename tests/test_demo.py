"""The web demo on a tiny random LTU-AS: one server for the module, asked through Gradio's Python client and
through its page in headless Chromium."""

from __future__ import annotations

import os
import re

import httpx
import jax
import numpy as np
import portpicker
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from playwright.sync_api import expect

from ltu_jax import audio, demo, infer
from ltu_jax.generate import SamplingConfig
from tests import demo_browser, train_setup

NEW_TOKENS = 8
QUESTION = "what was said"
MAX_SECONDS, MAX_UPLOAD_MB = 5, 1
ANSWER_TIMEOUT_S = 180  # the first request compiles transcription, features, prefill and step


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  return train_setup.build_answering(str(tmp_path_factory.mktemp("demo")), records=3)


@pytest.fixture(scope="module")
def clips(parts):
  return train_setup.speech_and_tone(parts["root"])


@pytest.fixture(scope="module")
def args(parts):
  return demo.parser().parse_args([
    "--model", parts["ltu_as"], "--port", str(portpicker.pick_unused_port()), "--greedy",
    "--max-new-tokens", str(NEW_TOKENS), "--max-seconds", str(MAX_SECONDS), "--max-upload-mb", str(MAX_UPLOAD_MB),
  ])


@pytest.fixture(scope="module")
def server(args, tmp_path_factory):
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads land here
    page = demo.serve(args)
    yield page
    page.close()


@pytest.fixture(scope="module")
def client(server):
  return Client(server.local_url, verbose=False, analytics_enabled=False, download_files=False)


@pytest.fixture(scope="module")
def loaded(parts):
  return infer.load_model(parts["ltu_as"])


@pytest.fixture(scope="module")
def sampling(loaded, args):
  """The server's: the kind's, greedy, NEW_TOKENS at most."""
  return infer.sampling_from_args(args, loaded)


@pytest.fixture(scope="module")
def expected(loaded, sampling, clips):
  """What `infer` says for each clip with the server's settings: (transcript, answer)."""
  heard = infer.hear(loaded, [audio.load_audio(clip) for clip in clips])
  answers = infer.answer(loaded, clips, QUESTION, sampling=sampling)
  return dict(zip(clips, zip(heard.transcripts, answers)))


def test_safe_defaults():
  args = demo.parser().parse_args(["--model", "m"])
  assert (args.host, args.share, args.max_upload_mb, args.max_seconds) == ("127.0.0.1", False, 20, None)


def test_the_server_listens_locally_one_request_at_a_time(server):
  assert server.server_name == "127.0.0.1" and not server.share and server.share_url is None
  assert server.max_file_size == MAX_UPLOAD_MB * 2**20
  (ask,) = [fn for fn in server.fns.values() if fn.api_name == "ask"]
  assert ask.concurrency_limit == 1 and server._queue.default_concurrency_limit == 1


def test_the_answer_streams_token_by_token_and_is_infers(client, clips, expected):
  for clip in clips:
    job = client.submit(handle_file(clip), QUESTION, api_name="/ask")  # the rest: the page's first settings
    transcript, answer = expected[clip]
    assert job.result(timeout=ANSWER_TIMEOUT_S) == (transcript, answer)
    outputs = job.outputs()
    assert outputs[0] == (transcript, "")  # the transcript comes first
    words = answer.split()  # the test tokenizer's tokens are words
    grown = [" ".join(words[:n]) for n in range(len(words) + 1)]
    assert list(dict.fromkeys(text for _, text in outputs)) == grown


def test_the_advanced_settings_reach_the_model(client, loaded, clips):
  sampled = SamplingConfig(max_new_tokens=4, do_sample=True, temperature=1.5, top_k=7, top_p=0.9)
  settings = dict(do_sample=True, temperature=1.5, top_p=0.9, top_k=7, repetition_penalty=1.0, max_new_tokens=4, seed=3)
  transcript, answer = client.predict(handle_file(clips[0]), QUESTION, "audio_only", *settings.values(), api_name="/ask")
  assert transcript == demo.NO_TRANSCRIPT
  assert answer == infer.answer(loaded, clips[:1], QUESTION, sampling=sampled, mode="audio_only", key=jax.random.key(3))[0]


def write_noise(path, seconds: float) -> str:
  sf.write(path, 0.1 * np.random.default_rng(0).normal(size=int(seconds * audio.SAMPLE_RATE)), audio.SAMPLE_RATE)
  return str(path)


def test_refused_clips_get_a_message_naming_them_and_the_server_goes_on(server, client, clips, expected, tmp_path):
  corrupt = tmp_path / "corrupt.wav"
  corrupt.write_bytes(b"RIFF not really a wave file")
  empty = write_noise(tmp_path / "empty.wav", 0)
  long = write_noise(tmp_path / "long.wav", MAX_SECONDS + 1)
  messages = {
    str(corrupt): "corrupt.wav is not an audio file this demo can read (Format not recognised.); try wav, flac, ogg or mp3",
    empty: "empty.wav holds no samples",
    long: f"long.wav is {MAX_SECONDS + 1:.1f} s long; this demo takes at most {MAX_SECONDS} s",
  }
  for path, message in messages.items():
    with pytest.raises(Exception, match=re.escape(message)):
      client.predict(handle_file(path), QUESTION, api_name="/ask")
  with pytest.raises(Exception, match="Upload or record a clip first"):
    client.predict(None, QUESTION, api_name="/ask")

  # Past the upload limit: the client refuses to send it, and the server refuses it if sent anyway.
  big = write_noise(tmp_path / "big.wav", 40)  # 16 kHz × 40 s × 16 bit: 1.3 MB
  assert os.path.getsize(big) > MAX_UPLOAD_MB * 2**20
  with pytest.raises(ValueError, match=f"exceeds the maximum file size of {MAX_UPLOAD_MB * 2**20} bytes"):
    client.predict(handle_file(big), QUESTION, api_name="/ask")
  with open(big, "rb") as f:
    refused = httpx.post(f"{server.local_url}gradio_api/upload", files={"files": ("big.wav", f)})
  assert refused.status_code == 413 and "maximum allowed size" in refused.text

  assert client.predict(handle_file(clips[1]), QUESTION, api_name="/ask") == expected[clips[1]]


def test_the_cli_refuses_other_folders_bad_limits_and_a_taken_port(parts, server, capsys):
  for argv, message in (
    (["--model", parts["whisper"]], "`demo` needs a model with audio; "),
    (["--model", parts["ltu_as"], "--max-seconds", "0"], "--max-seconds must be positive, got 0"),
    (["--model", parts["ltu_as"], "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--model", parts["ltu_as"], "--port", str(server.server_port)], f"Cannot find empty port in range: {server.server_port}"),
  ):
    with pytest.raises(SystemExit) as exit_info:
      demo.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_longest_clip_is_what_the_model_hears_by_default(parts, loaded):
  assert loaded.config.max_windows == 1
  for options, seconds in (([], 10), (["--max-windows", "3"], 30), (["--max-seconds", "12.5"], 12.5)):
    args = demo.parser().parse_args(["--model", parts["ltu_as"], *options])
    assert demo.settings_from_args(args, loaded).max_seconds == seconds


def test_the_page_in_chromium(server, loaded, sampling, clips, expected, tmp_path):
  transcript, answer = expected[clips[0]]
  with demo_browser.opened(server.local_url) as page:
    demo_browser.upload(page, clips[0])
    demo_browser.ask(page, QUESTION)
    assert demo_browser.answered(page, ANSWER_TIMEOUT_S) == answer
    assert page.locator("#transcript textarea").input_value() == transcript
    page.screenshot(path=tmp_path / "demo.png", full_page=True)

    recording = demo_browser.record(page, 2)  # Chromium's fake microphone: a beep
    assert 1.5 < sf.info(recording).duration < 4
    demo_browser.ask(page, QUESTION)
    (heard,) = infer.answer(loaded, [recording], QUESTION, sampling=sampling)
    expect(page.locator("#answer textarea")).to_have_value(heard, timeout=ANSWER_TIMEOUT_S * 1000)

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wave file")
    demo_browser.upload(page, str(corrupt))
    demo_browser.ask(page, QUESTION)
    expect(page.get_by_text("corrupt.wav is not an audio file this demo can read")).to_be_visible()
  with open(tmp_path / "demo.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
