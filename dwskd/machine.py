"""The facts a reader needs to compare timings between runs: platform, cores, torch, GPU, date."""

from __future__ import annotations

import datetime as dt
import os
import platform


def machine_info() -> dict[str, str | int | None]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")
