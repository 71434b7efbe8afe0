"""`python -m ltu_jax.demo --model DIR [--host 127.0.0.1] [--port 7860] [--share] [--max-upload-mb 20]
[--max-seconds S] [--mode M] [--greedy] [--max-new-tokens N] [--max-windows W] [--dtype D] [--seed S]`: a web
page where an audio-language model (LTU-AS) answers questions about a clip, as the original's Gradio demo
(ltu `src/ltu_as/inference_gradio.py`).

Upload or record a clip, ask a question (or pick one of the paper's), and the page shows the Whisper
transcript, then the answer as the engine decodes it, token by token (`infer.respond_stream`). The mode
(joint, audio only, transcript only) and the sampling settings sit under "Advanced"; the command line sets
their first values (by default the kind's sampling: LTU-AS's T=0.1, top-p 0.95, top-k 500).

Safe by default: the server listens on 127.0.0.1 only (`--host 0.0.0.0` opens it to the network; `--share`
asks Gradio for a public link, which needs the internet), uploads past `--max-upload-mb` are refused by
Gradio before they are stored, clips longer than `--max-seconds` (default: what the model hears, its
windows × 10 s) and files that are not audio get a message on the page naming the file, and Gradio's queue
runs one request at a time (the others wait their turn; at most `QUEUE_SIZE` wait).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Iterator, Sequence

import gradio as gr
import jax
import numpy as np
import soundfile as sf

from ltu_jax import audio, features, infer
from ltu_jax.generate import SamplingConfig
from ltu_jax.model_folder import Loaded

# The demo's own question first, then the paper's evaluation questions (facts §6.1).
EXAMPLE_QUESTIONS = (
  infer.DEFAULT_QUESTION,
  "Closed-ended question: Can you identify the spoken text?",
  "Is the speaker male or female? Output an answer anyways.",
  "How old is the speaker?",
  "How would you describe the speaker's emotions? Give the emotion classification.",
  "Close-ended question: Write an audio caption describing the sound.",
  "Describe the music genre with a sentence?",
)
MODE_LABELS = {"joint": "Audio and transcript (joint)", "audio_only": "Audio only", "asr_only": "Transcript only"}
NO_TRANSCRIPT = "(none: the model is given the audio only)"
MAX_NEW_TOKENS = 500  # the original demo's
QUEUE_SIZE = 16  # requests waiting their turn; past it Gradio tells the next one the queue is full
CACHE_HOURS = 1  # uploads are deleted from Gradio's cache after this long


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the page starts with and what it accepts."""

  sampling: SamplingConfig
  mode: str = "joint"
  seed: int = 0
  max_seconds: float = 10.0
  max_upload_mb: float = 20.0
  max_windows: int | None = None
  dtype: str | None = None


def read_clip(path: str, max_seconds: float) -> np.ndarray:
  """An uploaded or recorded clip as a 16 kHz waveform `[samples]`. Errors name the file as the user knows it
  (Gradio keeps the name, in a cache folder): too long, or not audio."""
  name = os.path.basename(path)
  try:
    seconds = sf.info(path).duration
  except sf.LibsndfileError as error:
    raise audio.AudioError(
      f"{name} is not an audio file this demo can read ({error.error_string}); try wav, flac, ogg or mp3"
    ) from error
  if seconds > max_seconds:
    raise audio.AudioError(f"{name} is {seconds:.1f} s long; this demo takes at most {max_seconds:g} s")
  try:
    return audio.load_audio(path)
  except audio.AudioError as error:
    raise audio.AudioError(str(error).replace(path, name)) from error


def ask(
  loaded: Loaded, settings: Settings, clip: str | None, question: str, mode: str, sampling: SamplingConfig, seed: int
) -> Iterator[tuple[str, str]]:
  """The page's request: yields (transcript, answer so far), the transcript first, then after each token.
  Raises `ValueError` (an `audio.AudioError` for the clip) with a message for the page."""
  if clip is None:
    raise ValueError("Upload or record a clip first.")
  if not question.strip():
    raise ValueError("Type a question, or pick one of the examples.")
  waveform = read_clip(clip, settings.max_seconds)
  name = os.path.basename(clip)
  heard = infer.hear(loaded, [waveform], mode, names=[name], max_windows=settings.max_windows, dtype=settings.dtype)
  transcript = NO_TRANSCRIPT if heard.transcripts is None else heard.transcripts[0]
  yield transcript, ""
  answers = infer.respond_stream(
    loaded, [question.strip()], heard.transcripts, heard.audio, mode=mode, sampling=sampling, key=jax.random.key(seed)
  )
  for so_far in answers:
    yield transcript, so_far[0]


def build(loaded: Loaded, settings: Settings) -> gr.Blocks:
  """The page, for one loaded model."""
  first = settings.sampling

  def on_ask(clip, question, mode, do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed):
    try:
      sampling = SamplingConfig(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
        top_k=int(top_k), top_p=float(top_p), repetition_penalty=float(repetition_penalty),
      )
      yield from ask(loaded, settings, clip, question, mode, sampling, int(seed or 0))  # a cleared box: None
    except ValueError as error:  # bad audio or settings: a message on the page, and the server goes on
      raise gr.Error(str(error)) from error

  limits = f"at most {settings.max_seconds:g} s and {settings.max_upload_mb:g} MB"
  shown = os.path.relpath(loaded.folder)
  shown = loaded.folder if shown.startswith("..") else shown  # the folder as the user knows it
  with gr.Blocks(title="LTU-AS demo", analytics_enabled=False, delete_cache=(CACHE_HOURS * 3600,) * 2) as page:
    gr.Markdown(
      "# LTU-AS: listen, think and understand\n"
      f"Upload or record a clip ({limits}) and ask about its sounds and speech. Model: `{shown}`."
    )
    with gr.Row():
      with gr.Column():
        clip = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio clip", elem_id="clip")
        question = gr.Textbox(infer.DEFAULT_QUESTION, label="Question", lines=2, elem_id="question")
        gr.Examples([[q] for q in EXAMPLE_QUESTIONS], [question], label="Questions from the paper")
        with gr.Accordion("Advanced", open=False):
          mode = gr.Radio(
            [(MODE_LABELS[m], m) for m in infer.MODES], value=settings.mode, label="What the model is given",
            elem_id="mode",
          )
          do_sample = gr.Checkbox(first.do_sample, label="Sample (off: greedy)", elem_id="sample")
          temperature = gr.Slider(0.01, 2.0, first.temperature, step=0.01, label="Temperature")
          top_p = gr.Slider(0.05, 1.0, first.top_p, step=0.01, label="Top-p")
          top_k = gr.Slider(0, 1000, first.top_k, step=1, label="Top-k (0: off)")
          repetition_penalty = gr.Slider(1.0, 2.0, first.repetition_penalty, step=0.01, label="Repetition penalty")
          max_new_tokens = gr.Slider(
            1, max(MAX_NEW_TOKENS, first.max_new_tokens), first.max_new_tokens, step=1, label="Most new tokens"
          )
          seed = gr.Number(settings.seed, precision=0, label="Seed")
        button = gr.Button("Ask", variant="primary", elem_id="ask")
      with gr.Column():
        transcript = gr.Textbox(label="Whisper transcript", interactive=False, elem_id="transcript")
        answer = gr.Textbox(label="Answer", interactive=False, lines=8, elem_id="answer")
    inputs = [clip, question, mode, do_sample, temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed]
    gr.on([button.click, question.submit], on_ask, inputs, [transcript, answer], api_name="ask", concurrency_limit=1)
  return page


def settings_from_args(args: argparse.Namespace, loaded: Loaded) -> Settings:
  """The command line's settings; the longest clip by default is what the model hears (its windows × 10 s)."""
  windows = features.for_model(loaded, args.max_windows, args.dtype).frontend
  return Settings(
    sampling=infer.sampling_from_args(args, loaded), mode=args.mode, seed=args.seed,
    max_seconds=args.max_seconds or windows.max_windows * windows.window_seconds,
    max_upload_mb=args.max_upload_mb, max_windows=args.max_windows, dtype=args.dtype,
  )


def serve(args: argparse.Namespace) -> gr.Blocks:
  """Loads the model and starts the page's server without blocking; `block_thread()` waits on it, `close()`
  stops it."""
  loaded = infer.load_model(args.model, "demo", dtype=args.dtype)
  page = build(loaded, settings_from_args(args, loaded))
  page.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1, api_open=False)
  page.launch(
    server_name=args.host, server_port=args.port, share=args.share, max_file_size=int(args.max_upload_mb * 2**20),
    prevent_thread_lock=True, quiet=True,
  )
  return page


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m ltu_jax.demo", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="an LTU-AS model folder (python -m conversion.ltu_as)")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
  parser.add_argument("--port", type=int, default=7860, help="default: 7860")
  parser.add_argument("--share", action="store_true", help="also ask Gradio for a public link (off by default)")
  parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default: 20 MB)")
  parser.add_argument("--max-seconds", type=float, help="longest clip (default: the model's windows × 10 s)")
  infer.add_generation_arguments(parser, batch_size=None)
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  cli = parser()
  args = cli.parse_intermixed_args(argv)
  infer.check_arguments(cli, args)
  for name in ("max_upload_mb", "max_seconds"):
    value = getattr(args, name)
    if value is not None and value <= 0:
      cli.error(f"--{name.replace('_', '-')} must be positive, got {value:g}")
  try:
    page = serve(args)
  except (OSError, ValueError) as error:  # not a model folder, or the port is taken
    cli.error(str(error))
  print(f"LTU-AS demo on {page.local_url} (Ctrl+C stops it)", file=sys.stderr, flush=True)
  page.block_thread()


if __name__ == "__main__":
  main()
