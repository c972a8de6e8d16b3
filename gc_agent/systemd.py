"""Run an endpoint as a systemd service: render and install the gc-agent@.service unit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from gc_core.settings import FabricSettings

__all__ = ["BootInstall", "env_file_text", "render_unit", "systemd_running"]

#: Where the unit and the per-instance settings go by default.
UNIT_DIR = Path("/etc/systemd/system")
#: Where the Debian package installs the unit; a copy in UNIT_DIR would shadow it.
PACKAGED_UNIT = Path("/lib/systemd/system/gc-agent@.service")
ENV_DIR = Path("/etc/gc-fabric")
UNIT_NAME = "gc-agent@.service"


def render_unit(*, gc_agent: str, user: str, env_dir: Path) -> str:
    """The unit file with the command, the account and the settings folder filled in."""
    template = resources.files("gc_agent").joinpath(UNIT_NAME).read_text()
    return Template(template).substitute(gc_agent=gc_agent, user=user, env_dir=str(env_dir))


def env_file_text(settings: FabricSettings) -> str:
    """The instance's settings, as systemd's EnvironmentFile reads them."""
    lines = [f"GC_HOME={settings.home}", f"GC_BROKER_URL={settings.broker_url}",
             f"GC_REGISTRY_URL={settings.registry_url}", f"GC_USER={settings.user}"]
    return "\n".join(lines) + "\n"


def systemd_running() -> bool:
    """Whether systemd manages this machine (it does not inside most containers)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


@dataclass(frozen=True)
class BootInstall:
    """Where ``enable-on-boot`` puts the unit and an endpoint's settings."""

    name: str
    unit_dir: Path = UNIT_DIR
    env_dir: Path = ENV_DIR

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / UNIT_NAME

    @property
    def uses_packaged_unit(self) -> bool:
        """The Debian package's unit serves (installing into the default place would shadow it)."""
        return self.unit_dir == UNIT_DIR and PACKAGED_UNIT.exists()

    @property
    def env_path(self) -> Path:
        return self.env_dir / f"agent-{self.name}.env"

    @property
    def instance(self) -> str:
        return f"gc-agent@{self.name}.service"

    def install(self, settings: FabricSettings, user: str) -> None:
        """Write the unit and the settings (mode 0600: the broker URL may hold a password)."""
        gc_agent = str(Path(sys.executable).parent / "gc-agent")
        if not self.uses_packaged_unit:
            self.unit_dir.mkdir(parents=True, exist_ok=True)
            self.unit_path.write_text(render_unit(gc_agent=gc_agent, user=user,
                                                  env_dir=self.env_dir))
        self.env_dir.mkdir(parents=True, exist_ok=True)
        self.env_path.touch(mode=0o600, exist_ok=True)
        self.env_path.chmod(0o600)
        self.env_path.write_text(env_file_text(settings))

    def remove(self) -> None:
        """Remove this endpoint's settings; the shared unit stays for other endpoints."""
        self.env_path.unlink(missing_ok=True)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl ARGS gc-agent@NAME.service``."""
        return subprocess.run(["systemctl", *args, self.instance], capture_output=True, text=True,
                              check=False)
