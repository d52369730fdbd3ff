"""fvar studio in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
pick a class by name, Generate, the gallery's images decode and count; paint a stroke on the edit
canvas, Inpaint, the result changes inside the mask. Screenshots go to the test's folder (and to
$FVAR_STUDIO_SCREENSHOTS when set: docs/ holds the ones the README shows)."""
from __future__ import annotations

import io
import os
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the studio extra (gradio) is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from fvar_core import bundle  # noqa: E402
from tests.test_studio import free_port  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium + chromedriver (apt-get install "
                                                                   "chromium chromium-driver, as .ci/run does as root)"),
              pytest.mark.skipif(not bundle.bundled_names(), reason="no bundled models in this checkout")]


@pytest.fixture(scope="module")
def page():
    from fvar_studio.app import launch
    from fvar_studio.service import Studio

    studio = Studio([("fmnist-32", None), ("fmnist-32-var", None)], device="cpu")
    demo, url = launch(studio, port=free_port(), block=False)
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(DRIVER))
    driver.get(url)
    yield driver
    driver.quit()
    demo.close()


def _wait(pred, timeout: float = 60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def _fetch(src: str) -> Image.Image:
    with urllib.request.urlopen(src, timeout=30) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def _shot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    keep = os.environ.get("FVAR_STUDIO_SCREENSHOTS")
    if keep:
        shutil.copy(tmp_path / name, Path(keep) / name)


def test_generate_then_inpaint_in_the_browser(page, tmp_path):
    d = page
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#gen-classes input"))
    box = d.find_element(By.CSS_SELECTOR, "#gen-classes input")
    while d.find_elements(By.CSS_SELECTOR, "#gen-classes .token-remove"):  # drop the default class
        d.find_elements(By.CSS_SELECTOR, "#gen-classes .token-remove")[0].click()
        time.sleep(0.2)
    box.click()
    box.send_keys("ankle")
    option = _wait(lambda: [o for o in d.find_elements(By.CSS_SELECTOR, "[role=option]") if "ankle boot" in o.text])
    option[0].click()
    box.send_keys(Keys.ESCAPE)
    chosen = [t.text for t in d.find_elements(By.CSS_SELECTOR, "#gen-classes .token")]
    assert any("ankle boot" in t for t in chosen), chosen
    d.find_element(By.ID, "gen-button").click()
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#gen-strips img"))
    imgs = _wait(lambda: (lambda x: x if len(x) >= 4 * len(chosen) else None)(
        d.find_elements(By.CSS_SELECTOR, "#gen-gallery img")))
    assert len(imgs) == 4 * len(chosen)
    pics = [_fetch(i.get_attribute("src")) for i in imgs]
    assert all(p.size == (32, 32) for p in pics)
    cmd = d.find_element(By.CSS_SELECTOR, "#gen-command textarea").get_attribute("value")
    assert cmd.startswith("fvar sample --ckpt fmnist-32 --class 9") and "--n 4" in cmd
    _shot(d, tmp_path, "studio-generate.png")

    # Edit: the first sample onto the canvas, one brush stroke across its upper half, inpaint
    [t for t in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Edit"][0].click()
    [b for b in _wait(lambda: d.find_elements(By.TAG_NAME, "button")) if "first sample" in b.text][0].click()
    editor = d.find_element(By.ID, "edit-canvas")
    _wait(lambda: editor.find_elements(By.CSS_SELECTOR, "button[aria-label=Brush]"))
    time.sleep(1.0)  # the image settles on the canvas
    editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
    canvas = editor.find_elements(By.TAG_NAME, "canvas")[-1]
    h = canvas.size["height"]
    ActionChains(d).move_to_element_with_offset(canvas, -h // 4, -h // 5).click_and_hold() \
        .move_by_offset(h // 8, 0).move_by_offset(h // 8, 0).move_by_offset(h // 8, 0).move_by_offset(h // 8, 0) \
        .release().perform()
    time.sleep(0.5)
    d.find_element(By.ID, "edit-button").click()
    res = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#edit-result img"))
    result = np.asarray(_fetch(res[0].get_attribute("src")), dtype=float)
    links = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#edit-files a"))
    files = {Path(a.get_attribute("href").split("?")[0]).name: a.get_attribute("href") for a in links}
    mask = np.asarray(_fetch(files["mask.png"]))[..., 0] > 127
    source = np.asarray(_fetch(files["input.png"]), dtype=float)
    assert 0 < mask.mean() < 0.6, mask.mean()  # a stroke, not the whole image
    inside = np.abs(result - source)[mask].mean()
    outside = np.abs(result - source)[~mask].mean()
    # outside the mask only the tokenizer's reconstruction error remains; inside, new content
    assert inside > 2 * outside, (inside, outside)
    _shot(d, tmp_path, "studio-edit.png")
