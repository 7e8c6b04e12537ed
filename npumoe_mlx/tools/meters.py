"""Measure what a run costs besides time: energy, CPU seconds, peak memory.

Every meter is start/stop around the measured region and reports ``None`` plus a
reason when this machine cannot measure (no guessing):

- energy: macOS ``powermetrics`` (root only; ``npumoe_mlx.planning.power`` samples it), or Linux
  powercap/RAPL package counters (``/sys/class/powercap/intel-rapl:N/energy_uj``,
  polled in a thread so counter wraparound is handled). Both are package- or
  SoC-wide: other processes running at the same time are counted too.
- CPU: ``time.process_time()`` of this process (all threads: MLX and onnxruntime).
- memory: the process RSS high-water (Linux: VmHWM, reset per region through
  ``/proc/self/clear_refs``; elsewhere ``getrusage`` ru_maxrss since the process
  started) and MLX's allocator peak (``mx.get_peak_memory``, reset per region).
"""

import resource
import sys
import threading
import time
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx

from ..planning.power import PowerSampler, parse_powermetrics, powermetrics_cmd  # noqa: F401 (parse_powermetrics: re-exported)

# --- energy ------------------------------------------------------------------


class EnergyMeter:
    """No energy counter on this machine: ``stop()`` returns None; ``note`` says why."""

    name = "none"

    def __init__(self, note: str):
        self.note = note

    def start(self) -> None:
        pass

    def stop(self) -> Optional[float]:
        return None


class RaplMeter(EnergyMeter):
    """Linux powercap/RAPL: sum of the package domains' ``energy_uj`` counters (J)."""

    name = "rapl"
    POLL_S = 1.0  # far below the fastest wrap (~60 s at 4 kW for a 2^38 uJ range)

    def __init__(self, domains: List[Path]):
        self.domains = domains
        self.note = (
            f"Linux powercap/RAPL, {len(domains)} package domain(s) "
            f"({', '.join(d.name for d in domains)}); package-wide: includes other processes"
        )
        self._ranges = [int((d / "max_energy_range_uj").read_text()) for d in domains]
        self._thread = None

    def _read(self) -> List[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def _accumulate(self) -> None:
        cur = self._read()
        for i, (a, b) in enumerate(zip(self._last, cur)):
            self._uj += b - a if b >= a else b + self._ranges[i] - a  # wrapped once
        self._last = cur

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            with self._lock:
                self._accumulate()

    def start(self) -> None:
        self._uj, self._last = 0, self._read()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> Optional[float]:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._accumulate()
        return self._uj / 1e6


def _rapl_domains() -> Tuple[List[Path], str]:
    """Readable top-level RAPL package domains, or [] and why not."""
    root = Path("/sys/class/powercap")
    if not root.is_dir():
        return [], "no /sys/class/powercap (no RAPL interface: VM, container or non-x86 host)"
    pkgs = sorted(Path(p) for p in glob(str(root / "intel-rapl:*")) if Path(p).name.count(":") == 1)
    if not pkgs:
        return [], "no RAPL package domain under /sys/class/powercap"
    readable = []
    for p in pkgs:
        try:
            int((p / "energy_uj").read_text())
            int((p / "max_energy_range_uj").read_text())
            readable.append(p)
        except (OSError, ValueError):
            pass
    if not readable:
        return [], (
            f"{pkgs[0]}/energy_uj is not readable (root only since Linux 5.10); "
            f"`sudo chmod a+r {root}/intel-rapl:*/energy_uj` to enable"
        )
    return readable, ""


class PowermetricsMeter(EnergyMeter):
    """macOS ``powermetrics`` (CPU + GPU + ANE power; ``npumoe_mlx.planning.power`` samples and parses it).

    Energy = sample-time-weighted mean combined power x the region's wall time.
    """

    name = "powermetrics"
    INTERVAL_MS = PowerSampler.INTERVAL_MS

    def __init__(self, cmd: List[str]):
        self.sampler = PowerSampler(cmd)
        self.note = (
            f"macOS powermetrics (CPU+GPU+ANE combined power, {self.INTERVAL_MS} ms samples) "
            "x wall time; SoC-wide: includes other processes"
        )
        self.parts = {}

    def start(self) -> None:
        self.sampler.start()

    def stop(self) -> Optional[float]:
        watts = self.sampler.stop()
        wall = self.sampler.wall_s
        if watts is None:
            self.note += "; no usable samples (region shorter than one interval, or no permission)"
            return None
        self.parts = {k: w * wall for k, w in watts.items() if k != "combined"}
        return watts["combined"] * wall


def energy_meter() -> EnergyMeter:
    """The best energy counter this machine allows; an EnergyMeter(note) when none."""
    if sys.platform == "darwin":
        cmd, why = powermetrics_cmd()
        return PowermetricsMeter(cmd) if cmd else EnergyMeter(why)
    if sys.platform.startswith("linux"):
        domains, why = _rapl_domains()
        return RaplMeter(domains) if domains else EnergyMeter(why)
    return EnergyMeter(f"no energy counter supported on {sys.platform}")


# --- memory --------------------------------------------------------------------


def _vm_hwm_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the RSS high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


class MemoryMeter:
    """Peak RSS (bytes) and MLX allocator peak (bytes) over a region."""

    def start(self) -> None:
        mx.reset_peak_memory()
        self.resettable = _reset_hwm() and _vm_hwm_bytes() is not None
        self.note = (
            "peak_mem_gb: process RSS high-water over the region (Linux VmHWM, reset per region); "
            "mlx_peak_mem_gb: mx.get_peak_memory()"
            if self.resettable
            else "peak_mem_gb: process RSS high-water since process start (getrusage ru_maxrss; "
            "cannot be reset here, so it may include earlier work); mlx_peak_mem_gb: mx.get_peak_memory()"
        )

    def stop(self) -> Tuple[int, int]:
        rss = _vm_hwm_bytes() if self.resettable else _maxrss_bytes()
        return int(rss), int(mx.get_peak_memory())


# --- all of them -----------------------------------------------------------------


@dataclass
class Reading:
    wall_s: float
    cpu_s: float  # process CPU seconds (all threads)
    peak_rss_bytes: int
    mlx_peak_bytes: int
    energy_j: Optional[float]


class Meters:
    """Wall, CPU, memory and energy around one region: ``start()`` ... ``stop() -> Reading``."""

    def __init__(self, energy: Optional[EnergyMeter] = None):
        self.energy = energy or energy_meter()
        self.memory = MemoryMeter()

    def start(self) -> None:
        self.memory.start()
        self.energy.start()
        self._cpu0, self._t0 = time.process_time(), time.perf_counter()

    def stop(self) -> Reading:
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._cpu0
        joules = self.energy.stop()
        rss, mlx_peak = self.memory.stop()
        return Reading(wall, cpu, rss, mlx_peak, joules)
