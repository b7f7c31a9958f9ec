"""Debian packages some tests need (SLURM, MUNGE, the JHU atlas of mricron-data), installed with apt when missing
and we are root."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(packages: tuple[str, ...]) -> str | None:
    """``apt-get install`` the packages (updating the lists once if that fails); why it cannot, or None."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(packages)} not installed, and we cannot apt-get them as non-root"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    install = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    if install.returncode != 0:
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
        install = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
        if install.returncode != 0:
            return f"apt-get install {' '.join(packages)} failed: {(update.stderr + install.stderr)[-500:]}"
    return None
