"""fvar studio under a person and under load (a benchmark, not a test), as JSON.

    python benchmarks/studio_load.py [--clients 20] [--requests 3] [--rounds 3]

Starts `fvar studio` (the bundled release and its twin, CPU) in its own process on a free port.
- browser (needs Debian's chromium + chromium-driver): the page opened in headless Chromium,
  8 images of one class requested with the default settings (the twin beside it), Generate pressed;
  seconds until the first focus strip shows and until the gallery holds all 8 — per round.
- load: --clients gradio_client clients at once, each --requests generations of 4 images;
  every answer checked (4 images), the server's RSS after a warm-up request and after each
  round of the load (--load-rounds), and whether the server still answers. FVAR_MALLOC=default
  in the environment serves with glibc's default allocator (fvar_core/cpualloc.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

FVAR, TWIN = "fmnist-32 (FVAR, 32 px)", "fmnist-32-var (VAR, 32 px)"
DEFAULTS = (1.5, "var", "linear", 900, 0.96, False, "per-image", 0, "", "", "auto")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_rounds(url: str, rounds: int) -> list:
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
    out = []
    try:
        for r in range(rounds):
            d.get(url)
            while not d.find_elements(By.CSS_SELECTOR, "#gen-n input[type=number]"):
                time.sleep(0.05)
            n = d.find_element(By.CSS_SELECTOR, "#gen-n input[type=number]")
            n.clear()
            n.send_keys("8")
            seed = d.find_element(By.CSS_SELECTOR, "#gen-seed input")
            seed.clear()
            seed.send_keys(str(100 * r))
            time.sleep(0.3)
            t0 = time.perf_counter()
            d.find_element(By.ID, "gen-button").click()
            first = None
            while time.perf_counter() - t0 < 120:
                if first is None and d.find_elements(By.CSS_SELECTOR, "#gen-strips img"):
                    first = time.perf_counter() - t0
                if len(d.find_elements(By.CSS_SELECTOR, "#gen-gallery img")) >= 8:
                    break
                time.sleep(0.02)
            out.append({"first_strip_s": first, "gallery_s": time.perf_counter() - t0,
                        "images": len(d.find_elements(By.CSS_SELECTOR, "#gen-gallery img"))})
    finally:
        d.quit()
    return out


def load(url: str, clients: int, requests: int) -> dict:
    from gradio_client import Client

    answers, errors = [], []

    def one(i: int) -> None:
        try:
            c = Client(url, verbose=False)
            for k in range(requests):
                t = time.perf_counter()
                res = c.predict(FVAR, "(none)", ["7 · sneaker"], 4, 1000 * i + k, *DEFAULTS, api_name="/generate")
                answers.append({"client": i, "images": len(res[1]), "s": time.perf_counter() - t})
        except Exception as e:  # counted, not raised: the point is how many are answered
            errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "requests_each": requests, "answered": len(answers),
            "all_complete": all(a["images"] == 4 for a in answers), "errors": errors[:5],
            "wall_s": time.perf_counter() - t0,
            "latency_s": {"median": statistics.median(a["s"] for a in answers) if answers else None,
                          "max": max((a["s"] for a in answers), default=None)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="browser rounds")
    ap.add_argument("--load-rounds", type=int, default=2, help="the load, repeated: memory that plateaus is "
                                                               "retained by the allocator, memory that grows leaks")
    ap.add_argument("--no-browser", action="store_true")
    a = ap.parse_args()
    port = free_port()
    fvar = str(Path(sys.executable).with_name("fvar"))
    server = subprocess.Popen([fvar, "studio", "--port", str(port), "--device", "cpu"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        from gradio_client import Client

        t0 = time.time()
        while True:
            try:
                c = Client(url, verbose=False)
                break
            except Exception:
                if time.time() - t0 > 120 or server.poll() is not None:
                    raise SystemExit("the studio did not start: " + (server.stderr.read() if server.poll() else ""))
                time.sleep(0.5)
        c.predict(FVAR, TWIN, ["7 · sneaker"], 4, 0, *DEFAULTS, api_name="/generate")  # warm-up
        report = {"rss_after_warmup_mib": rss(server.pid) / 2 ** 20}
        if shutil.which("chromium") and shutil.which("chromedriver") and not a.no_browser:
            report["browser"] = browser_rounds(url, a.rounds)
            report["rss_after_browser_mib"] = rss(server.pid) / 2 ** 20
        report["load"] = []
        for _ in range(a.load_rounds):
            report["load"].append(load(url, a.clients, a.requests))
            report["load"][-1]["rss_after_mib"] = rss(server.pid) / 2 ** 20
        res = Client(url, verbose=False).predict(FVAR, "(none)", ["0 · t shirt top"], 1, 0, *DEFAULTS,
                                                 api_name="/generate")
        report["alive_after"] = server.poll() is None and len(res[1]) == 1
        print(json.dumps(report, indent=1))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
