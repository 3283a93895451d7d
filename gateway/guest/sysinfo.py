"""System facts for the Guest API's SysInfo and the public ``/metrics`` (Linux /proc)."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

__all__ = ["metrics_text", "sys_info"]


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sys_info(data_disks: tuple[str, ...] = ("/",)) -> dict[str, Any]:
    """``SystemInfo`` as the Guest API returns it (loadavg values x100)."""
    mem = _meminfo()
    try:
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        uptime = int(float(Path("/proc/uptime").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        load, uptime = [0.0, 0.0, 0.0], 0
    disks = []
    for mount in data_disks:
        try:
            usage = shutil.disk_usage(mount)
        except OSError:
            continue
        disks.append(
            {
                "name": mount,
                "mount_point": mount,
                "total_size": usage.total,
                "free_size": usage.free,
            }
        )
    total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
    uname = os.uname()
    return {
        "os_name": uname.sysname,
        "os_version": platform.release(),
        "kernel_version": uname.release,
        "cpu_model": _cpu_model(),
        "num_cpus": os.cpu_count() or 0,
        "total_memory": total,
        "available_memory": avail,
        "used_memory": total - avail,
        "free_memory": mem.get("MemFree", 0),
        "total_swap": mem.get("SwapTotal", 0),
        "used_swap": mem.get("SwapTotal", 0) - mem.get("SwapFree", 0),
        "free_swap": mem.get("SwapFree", 0),
        "uptime": uptime,
        "loadavg_one": int(load[0] * 100),
        "loadavg_five": int(load[1] * 100),
        "loadavg_fifteen": int(load[2] * 100),
        "disks": disks,
    }


def metrics_text(info: dict[str, Any]) -> str:
    """Prometheus text format, ``system_*`` gauges like dstack's ``metrics.tpl``."""
    lines = []
    for key in (
        "num_cpus", "total_memory", "available_memory", "used_memory", "free_memory",
        "total_swap", "used_swap", "free_swap", "uptime",
    ):  # fmt: skip
        lines.append(f"# TYPE system_{key} gauge")
        lines.append(f"system_{key} {int(info[key])}")
    for key in ("loadavg_one", "loadavg_five", "loadavg_fifteen"):
        lines.append(f"# TYPE system_{key} gauge")
        lines.append(f"system_{key} {info[key] / 100:.2f}")
    lines.append("# TYPE system_disk_total_size gauge")
    for disk in info["disks"]:
        mount = str(disk["mount_point"]).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'system_disk_total_size{{mount_point="{mount}"}} {disk["total_size"]}')
        lines.append(f'system_disk_free_size{{mount_point="{mount}"}} {disk["free_size"]}')
    return "\n".join(lines) + "\n"
