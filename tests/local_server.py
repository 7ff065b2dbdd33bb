"""A bounded local aiohttp server for tests: 127.0.0.1, a free port, its own thread and event
loop; stops on context exit or, at the latest, after ``max_seconds`` (a hung test cannot leave
it running)."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from aiohttp import web


@contextlib.contextmanager
def serve(app: web.Application, max_seconds: float = 120.0):
  """Yields the base URL (http://127.0.0.1:PORT) while ``app`` is served."""
  loop = asyncio.new_event_loop()
  started, state = threading.Event(), {}

  async def start():
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["runner"] = runner
    state["port"] = runner.addresses[0][1]
    started.set()

  def run():
    loop.run_until_complete(start())
    stopper = loop.call_later(max_seconds, loop.stop)
    loop.run_forever()
    stopper.cancel()
    loop.run_until_complete(state["runner"].cleanup())
    loop.close()

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  if not started.wait(30):
    raise RuntimeError("local test server did not start")
  try:
    yield f"http://127.0.0.1:{state['port']}"
  finally:
    try:
      loop.call_soon_threadsafe(loop.stop)
    except RuntimeError:  # closed: it already stopped itself at max_seconds
      pass
    thread.join(10)


def refused_url() -> str:
  """A URL on 127.0.0.1 where nothing listens (connection refused)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/score"
