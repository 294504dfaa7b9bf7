"""A Google Cloud Storage server on loopback for the tests: gcp-storage-emulator, plus the
two things of the real service that TensorStore (Orbax's checkpoints) and the workdir lease
rely on and the emulator leaves out: the ``x-goog-generation`` header on downloads, and the
generation preconditions (``ifGenerationMatch`` on writes, reads and deletes,
``ifGenerationNotMatch`` on reads: 412 and 304 as GCS answers).

    python -m tests.gcs_server --port 8123 --bucket test-bucket   # prints 'ready', serves
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage

_request = threading.local()   # the request being served on this thread


class _Precondition(Exception):
    def __init__(self, status: HTTPStatus):
        super().__init__(status.phrase)
        self.status = status


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _check(storage, bucket: str, name: str, query: dict) -> None:
    current = _generation(storage, bucket, name)
    match = query.get("ifGenerationMatch")
    if match and match[0] != current:
        raise _Precondition(HTTPStatus.PRECONDITION_FAILED)
    not_match = query.get("ifGenerationNotMatch")
    if not_match and not_match[0] == current:
        raise _Precondition(HTTPStatus.NOT_MODIFIED)


def _with_preconditions(handler):
    @functools.wraps(handler)
    def serve(request, response, storage, *args, **kwargs):
        _request.value = request
        params = request.params or {}
        try:
            if "object_id" in params and request.method in ("GET", "DELETE"):
                _check(storage, params["bucket_name"], params["object_id"], request.query)
            return handler(request, response, storage, *args, **kwargs)
        except _Precondition as e:
            response.status = e.status
    return serve


def _checked_write(write):
    """Storage.create_file / create_resumable_upload, refusing a failed precondition."""
    @functools.wraps(write)
    def checked(self, bucket_name, file_name, *args, **kwargs):
        request = getattr(_request, "value", None)
        if request is not None:
            _check(self, bucket_name, file_name, request.query)
        return write(self, bucket_name, file_name, *args, **kwargs)
    return checked


def _download_with_generation(download):
    @functools.wraps(download)
    def serve(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return serve


def install() -> None:
    """Adds the headers and preconditions to the emulator's handlers (in this process)."""
    plain_download = objects.download
    objects.download = _download_with_generation(plain_download)
    objects.insert = _with_preconditions(objects.insert)
    Storage.create_file = _checked_write(Storage.create_file)
    Storage.create_resumable_upload = _checked_write(Storage.create_resumable_upload)
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is plain_download:
                handler = objects.download
            handlers[method] = _with_preconditions(handler)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bucket", required=True)
    args = p.parse_args()
    install()
    gcs = server.create_server("127.0.0.1", args.port, in_memory=True,
                               default_bucket=args.bucket)
    gcs.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        gcs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
