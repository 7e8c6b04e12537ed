"""Power of the SoC's units (CPU, GPU, ANE) while a region runs: macOS ``powermetrics``.

``npumoe tune`` measures the ANE's and the GPU's active power with it while it runs the
Core ML and MLX benchmarks (the cost model's energy terms); ``tools/meters.py`` builds
its whole-run energy meter on it. powermetrics runs only as root: ``powermetrics_cmd``
says why not when it cannot, and callers fall back (tune: the chip table).

Format read (``powermetrics -f plist``): one XML plist per sample, samples separated by a
NUL byte (as tlkh/asitop reads them, asitop/utils.py ``enqueue_powermetrics``); each has
``elapsed_ns`` (the sample's length) and a ``processor`` dict with ``cpu_power``,
``gpu_power``, ``ane_power`` and ``combined_power`` in mW (and ``*_energy`` in mJ over
the sample). A real sample: graelo/pumas tests/data/powermetrics-output-m2ultra.xml
(Mac14,14, macOS 23E224: elapsed_ns 1023721416, gpu_power 70924.6, gpu_energy 72607).
"""

import os
import plistlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

UNITS = ("cpu", "gpu", "ane")


def split_samples(raw: bytes) -> List[dict]:
    """The plist samples of a ``powermetrics -f plist`` output; a partial (cut-off) one is skipped."""
    out = []
    for chunk in raw.split(b"\x00"):
        chunk = chunk.strip()
        if not chunk:
            continue
        try:
            s = plistlib.loads(chunk)
        except Exception:  # plistlib raises several types on a truncated document
            continue
        if isinstance(s, dict):
            out.append(s)
    return out


def parse_powermetrics(samples: List[dict]) -> Optional[Dict[str, float]]:
    """Time-weighted mean power (W) over powermetrics samples: ``combined`` and each unit
    the samples report (cpu, gpu, ane); None if no sample has a power and a length."""
    tot_ns, acc = 0, {}
    for s in samples:
        p, ns = s.get("processor") or {}, s.get("elapsed_ns", 0)
        mw = {k: float(p[f"{k}_power"]) for k in UNITS if p.get(f"{k}_power") is not None}
        combined = p.get("combined_power", sum(mw.values()) if mw else None)
        if combined is None or not ns:
            continue
        tot_ns += ns
        for k, v in {"combined": float(combined), **mw}.items():
            acc[k] = acc.get(k, 0.0) + v * ns
    if not tot_ns:
        return None
    return {k: v / tot_ns / 1000.0 for k, v in acc.items()}


def powermetrics_cmd() -> Tuple[Optional[List[str]], str]:
    """The command that runs powermetrics here (as root, or through ``sudo -n``), or None and why not."""
    if sys.platform != "darwin":
        return None, f"powermetrics is macOS only (this is {sys.platform})"
    exe = shutil.which("powermetrics") or ("/usr/bin/powermetrics" if os.path.exists("/usr/bin/powermetrics") else None)
    if exe is None:
        return None, "powermetrics not found"
    if os.geteuid() == 0:
        return [exe], ""
    ok = subprocess.run(["sudo", "-n", exe, "-h"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    if ok:
        return ["sudo", "-n", exe], ""
    return None, "powermetrics needs root: run with sudo (or allow `sudo -n powermetrics`) to measure power"


class PowerSampler:
    """powermetrics sampling CPU, GPU and ANE power in a subprocess: ``start()`` ...
    ``stop() -> {"combined", "cpu", "gpu", "ane"} W`` (None if no sample landed)."""

    INTERVAL_MS = 100

    def __init__(self, cmd: List[str]):
        self.cmd = cmd

    def start(self) -> None:
        fd, self._out = tempfile.mkstemp(prefix="npumoe-powermetrics-", suffix=".plist")
        os.close(fd)
        self._proc = subprocess.Popen(
            self.cmd + ["--samplers", "cpu_power,gpu_power,ane_power", "-i", str(self.INTERVAL_MS),
                        "-f", "plist", "-o", self._out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 3.0  # wait for the first sample: the sampler is running
        while os.path.getsize(self._out) == 0 and time.monotonic() < deadline and self._proc.poll() is None:
            time.sleep(0.02)
        self._skip = os.path.getsize(self._out)  # samples from before start() are not the region's
        self.t0 = time.perf_counter()

    def stop(self) -> Optional[Dict[str, float]]:
        self.wall_s = time.perf_counter() - self.t0
        time.sleep(self.INTERVAL_MS / 1000)  # let the last interval land
        self._proc.send_signal(signal.SIGINT)  # sudo forwards it; powermetrics flushes and exits
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        try:
            raw = Path(self._out).read_bytes()
        finally:
            os.unlink(self._out)
        return parse_powermetrics(split_samples(raw[self._skip:]))


def power_sampler() -> Tuple[Optional[PowerSampler], str]:
    """A sampler for this machine, or None and why not (one line)."""
    cmd, why = powermetrics_cmd()
    return (PowerSampler(cmd), "") if cmd else (None, why)


def active_power(sampler: PowerSampler, fn, min_s: float = 1.0) -> Optional[Dict[str, float]]:
    """Mean power (W) per unit while ``fn()`` runs back to back for at least ``min_s``
    (several powermetrics intervals, so a sample holds only this work)."""
    sampler.start()
    t_end = time.perf_counter() + min_s
    fn()
    while time.perf_counter() < t_end:
        fn()
    return sampler.stop()
