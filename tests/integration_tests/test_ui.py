"""The web page (``api-prompt ui``, ``agents/ui.py``) as a real server on 127.0.0.1: driven through
``gradio_client`` (the map lands on the queried object of a demo scene, sliders re-render without an image
pass, bad uploads get messages, the loop runs) and loaded in headless Chromium over the DevTools protocol
(an example is clicked, the output images fill, a screenshot is saved).

The server runs in a subprocess under ``timeout`` (it cannot outlive ``SERVER_LIFETIME_S``) and is killed
with its process group when the module's tests end. Set ``API_PROMPT_UI_SCREENSHOT=path.png`` to also
write the browser's screenshot there (the README's ``examples/ui_screenshot.png`` was made so).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from api_tool.demo.scenes import Scene, generate_scene, name_of
from api_tool.render import attention_box

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")
websockets_sync = pytest.importorskip("websockets.sync.client")

ROOT = Path(__file__).resolve().parents[2]
SERVER_LIFETIME_S = 300
START_TIMEOUT_S = 120
BROWSER_TIMEOUT_S = 60
MAX_PIXELS = 1_000_000
MAX_UPLOAD_MB = 1
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SCENE_SEED = 11
"""Scene 11 (320 x 224, three objects) and "where is the green cross?": the demo CLIP's map peaks on the
cross with a clear margin (its best pixel inside the box beats the best outside by 0.42 of the mask)."""
QUESTION = "where is the green cross?"
SECOND_QUESTION = "where is the red star?"


def demo_scene() -> Scene:
    return generate_scene(SCENE_SEED, size=(320, 224), n_objects=3, background="gradient")


def box_of(scene: Scene, name: str) -> tuple[int, int, int, int]:
    (found,) = [obj.box for obj in scene.objects if name_of(obj) == name]
    return found


def inside(box: tuple[int, int, int, int], x: int, y: int) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"api-prompt ui exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"api-prompt ui did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """End ``process`` and its children (its own process group), politely, then not."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``api-prompt ui`` (through the CLI's sub-command dispatch) on a free port of 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    command = [
        *("timeout", "-k", "5", str(SERVER_LIFETIME_S)),
        *(sys.executable, "-m", "api_tool.cli", "ui", "--port", str(port), "--device", "cpu"),
        *("--max-pixels", str(MAX_PIXELS), "--max-upload-mb", str(MAX_UPLOAD_MB)),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, process, log)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return gradio_client.Client(server, verbose=False)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    demo_scene().image.save(path)
    return path


ATTEND_OUTPUTS = ("prompted", "heatmap", "crop", "text", "summary", "downloads", "status")
MAP_SETTINGS = {
    "model": "demo",
    "layer": None,
    "combine": "cls",
    "enhance_coe": 3.0,
    "kernel_size": 3,
    "style": "gray",
    "gray_level": 0,
}


def attend(client: Any, image: Path, question: str, **changes: Any) -> dict[str, Any]:
    """The page's /attend endpoint (the map panel's button), its outputs by name."""
    assert set(changes) <= set(MAP_SETTINGS), changes
    settings = MAP_SETTINGS | changes
    outputs = client.predict(gradio_client.handle_file(str(image)), question, *settings.values(), api_name="/attend")
    return dict(zip(ATTEND_OUTPUTS, outputs, strict=True))


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_map_peaks_on_the_queried_object_and_rerenders_without_an_image_pass(client: Any, scene_file: Path) -> None:
    scene = demo_scene()
    first = attend(client, scene_file, QUESTION)
    summary = first["summary"]
    assert first["status"] == ""
    box = box_of(scene, "green cross")
    peak = summary["peak"]
    assert inside(box, peak["x"], peak["y"]), (peak, box)
    assert summary["peak_on"] == ["green cross"] and summary["peak_in_queried_box"] is True
    assert "hits it" in first["text"] and "Timings" in first["text"]
    assert summary["image_size"] == [320, 224] and summary["grid"] == [18, 18]
    x0, y0, x1, y1 = summary["box"]
    assert x0 <= peak["x"] < x1 and y0 <= peak["y"] < y1
    assert set(summary["timings"]) >= {"image pass", "text pass + map", "mask", "upsample", "render", "total"}
    assert summary["image_pass_ran"] and not summary["map_cached"]  # (the browser test, which asks the same, runs last)
    png, npy = sorted(first["downloads"], key=lambda path: Path(path).suffix, reverse=True)
    mask = np.load(npy)
    assert mask.shape == (224, 320) and mask.dtype == np.float32
    assert np.unravel_index(int(np.argmax(mask)), mask.shape) == (peak["y"], peak["x"])
    assert np.array_equal(np.asarray(Image.open(png)), np.rint(mask * 255).astype(np.uint8))
    shown = pixels(first["prompted"])
    original = np.asarray(scene.image, dtype=np.float64)
    expected = np.rint(original * mask[..., None].astype(np.float64))  # the paper's gray prompt, gray level 0
    assert np.abs(shown.astype(np.float64) - expected).max() <= 1.0
    assert pixels(first["heatmap"]).shape == (224, 320, 3)
    assert np.array_equal(pixels(first["crop"]), np.asarray(scene.image.crop(attention_box(mask, 0.5, 0.1))))
    passes, attributions = summary["image_passes"], summary["attributions"]

    brighter = attend(client, scene_file, QUESTION, gray_level=128)
    assert not np.array_equal(pixels(brighter["prompted"]), shown)  # the image changed ...
    summary = brighter["summary"]
    assert summary["map_cached"] and not summary["image_pass_ran"]  # ... from the cached map
    assert (summary["image_passes"], summary["attributions"]) == (passes, attributions)
    assert "image pass" not in summary["timings"]

    sharper = attend(client, scene_file, QUESTION, enhance_coe=10.0, kernel_size=1)
    assert not np.array_equal(pixels(sharper["prompted"]), shown)
    summary = sharper["summary"]
    assert summary["map_cached"] and (summary["image_passes"], summary["attributions"]) == (passes, attributions)

    asked_again = attend(client, scene_file, SECOND_QUESTION)  # a new question: a text pass only
    summary = asked_again["summary"]
    assert asked_again["status"] == "" and not summary["map_cached"] and not summary["image_pass_ran"]
    assert "image pass (cached)" in summary["timings"] and "image pass" not in summary["timings"]
    assert (summary["image_passes"], summary["attributions"]) == (passes, attributions + 1)
    assert inside(box_of(scene, "red star"), summary["peak"]["x"], summary["peak"]["y"])

    summary = attend(client, scene_file, QUESTION, layer=3)["summary"]  # another block: a new image pass
    assert summary["image_pass_ran"] and summary["image_passes"] == passes + 1


def test_bad_input_gets_a_message_and_the_server_carries_on(
    client: Any, server: str, scene_file: Path, tmp_path: Path
) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are words, not pixels\n" * 20)
    refused = attend(client, not_an_image, QUESTION)
    assert [refused[name] for name in ("prompted", "heatmap", "crop", "summary")] == [None] * 4
    assert "notes.png" in refused["status"] and "not an image" in refused["status"]
    assert "/gradio" not in refused["status"]  # named as sent, not by the server's copy

    too_many_pixels = tmp_path / "wide.png"
    Image.new("RGB", (1250, 1000), (30, 60, 90)).save(too_many_pixels)
    refused = attend(client, too_many_pixels, QUESTION)
    assert refused["prompted"] is None
    assert "1,250,000 pixels" in refused["status"] and "--max-pixels" in refused["status"]

    refused = attend(client, scene_file, "   ")
    assert refused["prompted"] is None and "type a question" in refused["status"]

    refused = attend(client, scene_file, QUESTION, model="clip:no-such-model@openai")
    assert refused["prompted"] is None and "no-such-model" in refused["status"]

    too_big = tmp_path / "big.png"
    too_big.write_bytes(b"\x89PNG" + os.urandom(MAX_UPLOAD_MB * 1_000_000 + 1000))
    with pytest.raises(ValueError, match="maximum file size"):
        attend(client, too_big, QUESTION)  # refused before it is sent
    request = urllib.request.Request(  # and by the server, for a client that sends it anyway
        f"{server}gradio_api/upload",
        data=b"--b\r\nContent-Disposition: form-data; name=files; filename=big.png\r\n"
        b"Content-Type: image/png\r\n\r\n" + too_big.read_bytes() + b"\r\n--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(request, timeout=30)
    assert rejected.value.code == 413

    fine = attend(client, scene_file, QUESTION)
    assert fine["status"] == "" and fine["summary"]["peak_in_queried_box"]


def test_loop_panel_runs_the_demo_assistant_and_shows_the_images_each_round_sent(client: Any, scene_file: Path) -> None:
    trace, gallery, status = client.predict(
        gradio_client.handle_file(str(scene_file)),
        QUESTION,
        *("demo", None, "cls", 3.0, 3, "gray", 0),
        *("demo assistant", "", "", "", "masked", 1, "the auxiliary model above"),
        api_name="/reflect",
    )
    assert status == ""
    assert "**Round 0**" in trace and "**Round 1** (masked)" in trace and "**Final answer**" in trace
    assert [item["caption"] for item in gallery] == ["round 0: original", "round 1: annotated"]
    original, annotated = (pixels(item["image"]) for item in gallery)
    assert original.shape == annotated.shape == (224, 320, 3)
    assert np.array_equal(original, np.asarray(demo_scene().image))
    assert (annotated.astype(int) <= original.astype(int) + 1).all() and (annotated < original).any()  # grayed

    _, _, status = client.predict(
        gradio_client.handle_file(str(scene_file)),
        QUESTION,
        *("demo", None, "cls", 3.0, 3, "gray", 0),
        *("OpenAI-compatible", "", "", "", "verify", 1, "the auxiliary model above"),
        api_name="/reflect",
    )
    assert "name the OpenAI-compatible model" in status


# ----------------------------------------------------------------------------------------------
# The page in a real browser: headless Chromium driven over the DevTools protocol.
# ----------------------------------------------------------------------------------------------


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's open websocket."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"the page did not show {what} within {timeout} s")


def chromium_binary() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = chromium_binary()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[str]:
    """Headless Chromium with remote debugging; yields the DevTools HTTP address."""
    assert CHROMIUM is not None
    command = [
        *("timeout", "-k", "5", str(SERVER_LIFETIME_S), CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu"),
        *("--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars"),
        *("--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"),
        "about:blank",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            if line.startswith("DevTools listening on ws://"):
                address = line.split("ws://", 1)[1].split("/", 1)[0]
                break
            if time.monotonic() > deadline:
                pytest.fail("Chromium did not open its DevTools port")
        else:
            pytest.fail(f"Chromium exited ({process.wait()}) before opening its DevTools port")
        yield f"http://{address}"
    finally:
        stop(process)


def passes_shown(summary: str) -> int:
    """The count of image passes the page's summary text shows."""
    return int(summary.split("image passes so far: ", 1)[1].split()[0])


FILLED = """(() => {
  const img = document.querySelector('#%s img');
  return img !== null && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;
})()"""


@pytest.mark.skipif(
    CHROMIUM is None,
    reason=f"no Chromium binary on PATH (looked for {', '.join(CHROMIUM_NAMES)}); apt-get install chromium",
)
def test_page_in_headless_chromium_runs_an_example_and_fills_the_outputs(
    server: str, browser: str, tmp_path: Path
) -> None:
    with urllib.request.urlopen(f"{browser}/json/list", timeout=10) as response:
        (page,) = [target for target in json.load(response) if target["type"] == "page"]
    with websockets_sync.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket:
        tools = DevTools(socket)
        tools.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        tools.call("Page.navigate", url=server)
        tools.wait_for(
            "document.querySelectorAll('#examples button.gallery-item').length", BROWSER_TIMEOUT_S, "examples"
        )
        assert tools.evaluate("document.querySelector('#prompted-image img') === null")  # empty before the example
        label = tools.evaluate(
            "(() => { const b = document.querySelector('#examples button.gallery-item');"
            " b.click(); return b.innerText; })()"
        )
        assert label.startswith(f"scene {SCENE_SEED}: {QUESTION}")
        sizes = [tools.wait_for(FILLED % name, BROWSER_TIMEOUT_S, name) for name in ("prompted-image", "heatmap-image")]
        assert sizes == [[320, 224], [320, 224]]
        assert tools.wait_for(FILLED % "crop-image", 10, "the crop")
        summary = tools.wait_for(
            "(() => { const s = document.querySelector('#map-summary'); "
            "return s && s.innerText.includes('Peak') ? s.innerText : null; })()",
            10,
            "the summary",
        )
        assert "on the green cross" in summary and "the peak hits it" in summary
        passes = passes_shown(summary)
        rect = tools.evaluate(
            "(() => { const r = document.querySelector('#prompted-image img').getBoundingClientRect();"
            " return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]; })()"
        )
        bottom = tools.evaluate(
            "(() => { const r = document.querySelector('#map-summary').getBoundingClientRect();"
            " return r.bottom + window.scrollY; })()"
        )
        shot = tools.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1400, "height": round(bottom) + 16, "scale": 1},
        )
        gray_source = tools.evaluate("document.querySelector('#prompted-image img').src")
        tools.evaluate("document.querySelector('#style input[value=\"contour\"]').click()")  # a rendering change
        tools.wait_for(
            f"document.querySelector('#prompted-image img').src !== {json.dumps(gray_source)}", 30, "the contour"
        )
        summary = tools.wait_for(
            "(() => { const s = document.querySelector('#map-summary').innerText;"
            " return s.includes('cached map') ? s : null; })()",
            10,
            "the re-rendered summary",
        )
        assert passes_shown(summary) == passes  # no image pass for it
    data = base64.b64decode(shot["data"])
    (tmp_path / "ui.png").write_bytes(data)
    if os.environ.get("API_PROMPT_UI_SCREENSHOT"):
        Path(os.environ["API_PROMPT_UI_SCREENSHOT"]).write_bytes(data)
    screenshot = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    left, top, width, height = (round(v) for v in rect)
    shown = screenshot[top : top + height, left : left + width]
    assert shown.shape[0] > 100 and shown.shape[1] > 100
    near_black = (shown.max(axis=-1) < 24).mean()  # the faded background at gray level 0 ...
    assert near_black > 0.5, near_black  # ... fills the panel: the prompted image is drawn there
    assert (np.asarray(demo_scene().image).max(axis=-1) < 24).mean() < 0.01  # (the scene itself has none)
    assert shown.std() > 10
