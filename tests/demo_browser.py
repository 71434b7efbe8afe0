"""The demo's page driven in headless Chromium (Debian's, which scripts/setup.sh installs: Playwright cannot
download its own here), for the end-to-end test and the README's screenshot:

  python -m tests.demo_browser --model runs/tiny_stage3/model --audio CLIP --out docs/demo.png [--question Q]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import urllib.parse
from typing import Iterator

import portpicker
from playwright.sync_api import Page, sync_playwright

from ltu_jax import infer

CHROMIUM = "/usr/bin/chromium"
# As root (no sandbox), no GPU, nothing that calls the internet, and a fake microphone (a beep) that the page
# may use without asking.
CHROMIUM_ARGS = (
  "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--no-first-run", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
)
VIEWPORT = {"width": 1280, "height": 860}
UPLOADED = "#clip [data-testid=download-link]"  # shown once a clip has reached the server
# The answer's status tracker is hidden again once the answer has finished streaming.
ANSWERED = """() => {
  const tracker = document.querySelector('#answer [data-testid=status-tracker]');
  return tracker.classList.contains('hide') && document.querySelector('#answer textarea').value.length > 0;
}"""


@contextlib.contextmanager
def opened(url: str) -> Iterator[Page]:
  """The demo's page at `url`, loaded in headless Chromium."""
  if not os.access(CHROMIUM, os.X_OK):
    raise FileNotFoundError(f"{CHROMIUM} is missing: run bash scripts/setup.sh (it installs Debian's chromium)")
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
    try:
      page = browser.new_context(viewport=VIEWPORT, permissions=["microphone"]).new_page()
      page.goto(url)
      page.wait_for_selector("#ask")
      yield page
    finally:
      browser.close()


def upload(page: Page, clip: str) -> None:
  """Gives `clip` to the Audio component's file input (after clearing the one before, if any)."""
  clear(page)
  page.locator("#clip button[aria-label='Upload file']").click()  # the source may be the microphone
  page.locator("#clip input[type=file]").set_input_files(clip)
  page.locator(UPLOADED).wait_for()


def record(page: Page, seconds: float) -> str:
  """Records `seconds` from the microphone in the Audio component; returns the server's path of the recording."""
  clear(page)
  page.locator("#clip button[aria-label='Record audio']").click()
  page.locator("#clip button:visible", has_text=re.compile(r"^\s*Record\s*$")).click()
  page.wait_for_timeout(seconds * 1000)
  page.locator("#clip button:visible", has_text="Stop").first.click()
  link = page.locator(UPLOADED)
  link.wait_for()
  return urllib.parse.unquote(link.get_attribute("href").split("file=", 1)[1])


def clear(page: Page) -> None:
  if page.locator(UPLOADED).count():
    page.locator("#clip button[aria-label=Clear]").click()
    page.locator(UPLOADED).wait_for(state="detached")


def ask(page: Page, question: str) -> None:
  """Types `question` and presses Ask."""
  page.locator("#question textarea").fill(question)
  page.locator("#ask").click()


def answered(page: Page, timeout_s: float) -> str:
  """Waits until the first answer of the page has finished streaming; returns it."""
  page.wait_for_function(ANSWERED, timeout=timeout_s * 1000)
  return page.locator("#answer textarea").input_value()


def parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m tests.demo_browser", description="Screenshot of the demo answering.")
  parser.add_argument("--model", required=True, help="an LTU-AS model folder")
  parser.add_argument("--audio", required=True, help="the clip to ask about")
  parser.add_argument("--question", default=infer.DEFAULT_QUESTION, help="default: the demo's own")
  parser.add_argument("--out", default="docs/demo.png", help="where the PNG goes (default: docs/demo.png)")
  parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the answer")
  return parser


def main(argv: list[str] | None = None) -> None:
  from ltu_jax import demo

  args = parser().parse_args(argv)
  server = demo.serve(demo.parser().parse_args(["--model", args.model, "--port", str(portpicker.pick_unused_port())]))
  try:
    with opened(server.local_url) as page:
      upload(page, args.audio)
      ask(page, args.question)
      text = answered(page, args.timeout)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      page.screenshot(path=args.out, full_page=True)
  finally:
    server.close()
  print(f"{args.out}: the demo answering {args.question!r} about {args.audio}: {text!r}", file=sys.stderr)


if __name__ == "__main__":
  main()
