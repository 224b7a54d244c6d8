"""The served endpoint on a local Ray cluster (2 CPUs), the built-in model at 32 px and 2 steps.

One server answers health, PNG and JSON requests, concurrent requests (batched, each image as it is
alone) and bad ones (422 with the Python API's messages), then shuts down and frees its port; a second
one with a queue of one answers 503 under overload. The options, a missing Ray and the command line
are checked without the module's cluster; the command serves until Ctrl-C in a process of its own.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from diffblocks.cli import main
from diffblocks.scale import GenerationRequest, ServeOptions, Server, serve

# uv's run-time environment hook would start a second Python per worker; usage stats are not needed
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SMALL = {"height": 32, "width": 32, "num_inference_steps": 2}


# --- without a cluster ------------------------------------------------------------------------------------


def test_options_are_refused_before_ray_starts() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        ServeOptions(port=70000)
    with pytest.raises(ValidationError, match="max_batch_size 8 is above max_ongoing_requests 4"):
        ServeOptions(max_batch_size=8, max_ongoing_requests=4)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        serve(replicas=0)  # refused without touching Ray
    assert ServeOptions(max_batch_size=3).ongoing == 6


def test_without_ray_the_install_hint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[ray\]"'):
        serve()
    assert main(["serve"]) == 2
    assert 'diffblocks serve: error: serving needs Ray Serve, an optional extra: pip install -e ".[ray]"' in capsys.readouterr().err


def test_command_line_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import diffblocks.scale

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(diffblocks.scale, "serve", lambda model, **kw: calls.append((model, kw)))
    assert main(["serve", "--port", "0", "--replicas", "2", "--max-batch-size", "3", "--max-queued", "5"]) == 0
    model, options = calls[0]
    assert model is None and options["blocking"] is True
    assert (options["port"], options["replicas"], options["max_batch_size"], options["max_queued_requests"]) == (0, 2, 3, 5)
    monkeypatch.undo()
    assert main(["serve", "--max-batch-size", "0", "--max-queued", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch-size: Input should be greater than or equal to 1" in err
    assert "--max-queued: Input should be greater than or equal to 0" in err


def test_command_serves_until_ctrl_c() -> None:
    pytest.importorskip("ray")
    command = [sys.executable, "-m", "diffblocks.cli", "serve", "--port", "0", "--max-batch-size", "2"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment) as process:
        watchdog = threading.Timer(300, process.kill)  # a server that never comes up fails the test, not the run
        watchdog.start()
        try:
            assert process.stdout is not None
            pattern = re.compile(r"^serving the built-in model at (http://127\.0\.0\.1:(\d+)) \(Ctrl-C to stop\)$")
            found = next((match for line in process.stdout if (match := pattern.search(line.strip()))), None)
            assert found, "the command ended without printing its URL"
            with urllib.request.urlopen(found.group(1) + "/health", timeout=60) as answer:
                assert answer.status == 200
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=120) == 0
        finally:
            watchdog.cancel()
            process.kill()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(found.group(2))), timeout=5):
        pass


# --- on a local cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a module before this one left its cluster up
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(cluster: Any) -> Iterator[Server]:
    # a long enough wait that requests sent together on 2 busy CPUs meet in one batch
    with serve(port=0, max_batch_size=4, batch_wait_timeout_s=0.5, max_ongoing_requests=8) as running:
        yield running


def post(url: str, body: dict[str, Any] | bytes, *, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Accept": accept} if accept else {})}
    request = urllib.request.Request(url + "/generate", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_health(server: Server) -> None:
    with urllib.request.urlopen(server.url + "/health", timeout=60) as answer:
        assert answer.status == 200 and json.loads(answer.read()) == {"status": "ok", "model": "built-in"}


def test_png_and_json(server: Server) -> None:
    status, headers, png = post(server.url, {"prompt": "a red circle", "seed": 3, **SMALL})
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "3"
    assert pixels(png).shape == (32, 32, 3)

    status, headers, body = post(server.url, {"prompt": "a red circle", "seed": 3, "num_images": 2, **SMALL}, accept="application/json")
    assert status == 200 and headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["seeds"] == [3, 4] and answer["request"]["prompt"] == "a red circle" and answer["request"]["height"] == 32
    first, second = (pixels(base64.b64decode(image)) for image in answer["images"])
    assert np.abs(first - pixels(png)).max() <= 1  # image 0 of seed 3 is seed 3's single image (see below for the 1)
    assert not np.array_equal(first, second)

    # many images without JSON: no PNG can carry them
    status, _, body = post(server.url, {"prompt": "a red circle", "num_images": 2, **SMALL}, accept="image/png")
    assert status == 406 and 'send "Accept: application/json"' in json.loads(body)["error"]


def test_concurrent_requests_batched_and_each_as_alone(server: Server) -> None:
    bodies = [{"prompt": f"a {color} circle", "seed": seed, **SMALL} for seed, color in enumerate(["red", "blue", "green", "red"] * 2)]
    alone = [post(server.url, body) for body in bodies[:4]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: post(server.url, body), bodies))
    assert [status for status, _, _ in together] == [200] * len(bodies)
    assert max(int(headers["x-batch-size"]) for _, headers, _ in together) > 1  # some really ran together
    assert all(headers["x-batch-size"] == "1" for _, headers, _ in alone)
    for (_, _, png_alone), (_, _, png_together) in zip(alone, together):
        # the same noise (one generator per image); batched CPU kernels may round the last float bit
        # the other way, which moves a pixel by at most one level of 255
        assert np.abs(pixels(png_alone) - pixels(png_together)).max() <= 1


def test_bad_requests_422_with_the_python_messages(server: Server) -> None:
    bad_fields = {"prompt": "a red circle", "num_images": 0, "promt": "typo"}
    status, _, body = post(server.url, bad_fields)
    with pytest.raises(ValidationError) as python:
        GenerationRequest.model_validate_json(json.dumps(bad_fields))
    answer = json.loads(body)
    assert status == 422 and answer["error"] == str(python.value)
    assert answer["problems"] == [
        {"field": "num_images", "message": "Input should be greater than or equal to 1"},
        {"field": "promt", "message": "Extra inputs are not permitted"},
    ]

    status, _, body = post(server.url, {"prompt": "a red circle", "height": 30, "width": 32, "num_inference_steps": 2})
    answer = json.loads(body)
    assert status == 422 and answer["error"].startswith("1 input error in call to")
    assert answer["problems"] == [
        {
            "block": "workflow.text2img.prepare_latents",
            "field": "height",
            "message": "height 30 is not a positive multiple of 4 (the VAE factor); use 28 or 32",
            "fix": "",
        }
    ]

    status, _, body = post(server.url, {"prompt": "a red circle", "guidance_scale": -1.0, **SMALL})
    assert status == 422 and "guidance_scale" in json.loads(body)["error"]  # the pipeline's own bound
    status, _, body = post(server.url, b"{not json")
    assert status == 422 and json.loads(body)["problems"][0]["message"].startswith("Invalid JSON")


def test_one_server_per_cluster(server: Server) -> None:
    with pytest.raises(RuntimeError, match="Serve already runs on this Ray cluster"):
        serve(port=0)


def test_shutdown_closes_the_port(server: Server) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    server.shutdown()
    server.shutdown()  # a second time does nothing
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
        pass


def test_overload_answers_503(cluster: Any) -> None:
    slow = {"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 40}
    with serve(port=0, max_batch_size=1, max_ongoing_requests=1, max_queued_requests=1) as small:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: post(small.url, slow), range(6)))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 3, statuses
