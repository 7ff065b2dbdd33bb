"""``python gcs_emulator.py PORT BUCKET``: gcp-storage-emulator (in memory, one bucket) on
127.0.0.1:PORT, for tests/integration/test_gcs_workdir.py.

One fidelity fix over the stock emulator: real GCS answers a media download with
``x-goog-generation`` / ``x-goog-metageneration`` headers, and tensorstore's GCS driver (orbax's
array writer) reads the object generation from them ("Malformed StorageGeneration" without).
The emulator already keeps both in its object resource; this adds the headers.
"""
import sys
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # noqa: BLE001 - a 404 was already answered
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download_with_generation  # objects.get(alt=media) calls it by name
server.HANDLERS = tuple(
    (regex, {m: (download_with_generation if h is _download else h) for m, h in handlers.items()})
    for regex, handlers in server.HANDLERS)


def main(port: int, bucket: str) -> None:
  srv = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  srv.start()
  try:
    while True:
      time.sleep(1)
  finally:
    srv.stop()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
