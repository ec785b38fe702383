"""Energy: the joules a process has used, always with where the number comes from.

Sources, the first readable one wins:
- `rapl`: the CPU packages' energy counters (/sys/class/powercap/intel-rapl:N/energy_uj; bare metal,
  readable by the user; each wraps at its max_energy_range_uj). The whole package, other processes
  included: run nothing else beside a measurement.
- `nvml`: an NVIDIA GPU's total energy counter (millijoules; pynvml, when installed and the model is
  on CUDA), plus the CPU estimate below for the host's share.
- `estimate`: this process's CPU seconds (every thread: the kernels' pool included; and its engine
  replicas', `fulmine serve --replicas`) times a power
  figure per busy core, `--cpu-watts-per-core` (default 10 W: a server core at full load is ~4-8 W of
  its package's rated power, a desktop core ~10-20 W). A VM like this one has no readable counter;
  the number is then an estimate and its label says so, with the figure used.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable

DEFAULT_WATTS_PER_CORE = 10.0
RAPL = "/sys/class/powercap"


class _Rapl:
    def __init__(self) -> None:
        # package domains only (intel-rapl:0, not their sub-domains intel-rapl:0:0)
        self.paths = sorted(p for p in glob.glob(f"{RAPL}/intel-rapl:*") if p.count(":") == 1)
        self.last = [self._read(p) for p in self.paths]
        self.ranges = [self._range(p) for p in self.paths]
        self.total_uj = 0

    @staticmethod
    def _read(path: str) -> int:
        with open(os.path.join(path, "energy_uj")) as f:
            return int(f.read())

    @staticmethod
    def _range(path: str) -> int:
        try:
            with open(os.path.join(path, "max_energy_range_uj")) as f:
                return int(f.read())
        except OSError:
            return 2**32

    def joules(self) -> float:
        for i, path in enumerate(self.paths):
            now = self._read(path)
            delta = now - self.last[i]
            self.total_uj += delta if delta >= 0 else delta + self.ranges[i]  # the counter wrapped
            self.last[i] = now
        return self.total_uj / 1e6


class _Nvml:
    def __init__(self, index: int) -> None:
        import pynvml  # nvidia-ml-py: optional

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.start_mj = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def joules(self) -> float:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start_mj) / 1e3


class EnergyMeter:
    """Joules used since the meter was made, and `source`: how they were obtained."""

    def __init__(
        self,
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        cuda_device: int | None = None,
        other_cpu_seconds: Callable[[], float] | None = None,
    ) -> None:
        """`other_cpu_seconds`: CPU seconds of the other processes that serve beside this one (engine
        replicas), counted into the estimate."""
        self.watts_per_core = watts_per_core
        self.other_cpu_seconds = other_cpu_seconds
        self.start_cpu = time.process_time()
        self.start_wall = time.monotonic()
        self._rapl: _Rapl | None = None
        self._nvml: _Nvml | None = None
        try:
            rapl = _Rapl()
            if rapl.paths:
                self._rapl = rapl
        except (OSError, ValueError):  # absent, or root-only (as on most distributions since 2020)
            pass
        if self._rapl is None and cuda_device is not None:
            try:
                self._nvml = _Nvml(cuda_device)
            except Exception:  # no pynvml, no driver, or the counter unsupported on this GPU
                self._nvml = None
        estimate = f"estimate: CPU seconds x {watts_per_core:g} W per core"
        self.source = "rapl" if self._rapl else f"nvml + {estimate}" if self._nvml else estimate

    def cpu_joules(self) -> float:
        other = self.other_cpu_seconds() if self.other_cpu_seconds is not None else 0.0
        return (time.process_time() - self.start_cpu + other) * self.watts_per_core

    def joules(self) -> float:
        if self._rapl is not None:
            return self._rapl.joules()
        if self._nvml is not None:
            return self._nvml.joules() + self.cpu_joules()
        return self.cpu_joules()

    def watts(self) -> float:
        """Mean power since the meter was made."""
        elapsed = time.monotonic() - self.start_wall
        return self.joules() / elapsed if elapsed > 0 else 0.0
