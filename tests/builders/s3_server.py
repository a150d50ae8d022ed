"""A real S3-compatible server for the tests: moto's server mode on 127.0.0.1, in a child process.

`s3_server()` yields the environment that points boto/s3fs (and so fsspec's s3://) at it, with a
fresh bucket `BUCKET`; the server stops with the block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from builders.processes import free_port, stop_group

BUCKET = "tok1d-test"


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "moto's server exited at start"
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no S3 server at {endpoint} within 60 s"
                time.sleep(0.1)
        previous = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            import s3fs

            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
            yield env
        finally:
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        stop_group(server)
