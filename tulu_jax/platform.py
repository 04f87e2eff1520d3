"""Which JAX platforms a run may start, chosen before JAX starts so that CPU and GPU hosts start silently.

libtpu (installed by the `tpu` and `test` extras) probes for a Cloud TPU VM when JAX initializes its backends and,
on any other host, logs "Failed to find host bounds ... unexpected worker hostname" before JAX falls back. So unless
the user chose (JAX_PLATFORMS set) or the host has TPU chips, tulu-jax sets JAX_PLATFORMS to this host's other
platforms (cuda/rocm when a device and its JAX plugin are present, then cpu). `compile-check` loads libtpu on its own
to describe TPU topologies, which needs no TPU backend.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pathlib
import pkgutil
import sys

# TPU chips are PCI devices of Google's vendor id with these device ids (v3, -, v4, v5p, v5e, v6e, 7x): the table
# JAX 0.10.2 itself uses to detect a Cloud TPU VM (its hardware_utils module), read here without importing JAX.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
# Device files whose presence makes JAX try a GPU platform (JAX's hardware_utils module).
_GPU_DEVICES = {"cuda": ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"), "rocm": ("/dev/kfd",)}

_chosen: str | None = None  # the JAX_PLATFORMS value tulu-jax set (not the user's), None until set


def tpu_chip_count(pci_devices: str = "/sys/bus/pci/devices") -> int:
    """TPU chips attached to this host: PCI devices with Google's vendor id and a TPU device id (Linux sysfs)."""
    chips = 0
    for device in glob.glob(os.path.join(pci_devices, "*")):
        vendor, ident = (pathlib.Path(device, name) for name in ("vendor", "device"))
        try:
            chips += (vendor.read_text().strip() == _GOOGLE_PCI_VENDOR
                      and ident.read_text().strip() in _TPU_PCI_DEVICES)
        except OSError:  # an entry without readable ids is not a TPU
            continue
    return chips


def has_tpu_chips(pci_devices: str = "/sys/bus/pci/devices") -> bool:
    """Whether a TPU chip is attached to this host (see `tpu_chip_count`)."""
    return tpu_chip_count(pci_devices) > 0


def _installed_plugins() -> set[str]:
    """Names of the installed JAX PJRT plugins (the `jax_plugins` namespace and entry points), e.g. xla_cuda12."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins

        names |= {name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)}
    return names


def default_platforms() -> str | None:
    """The JAX_PLATFORMS value for this host: None on a TPU host (JAX chooses), else its GPU platforms with a
    device and an installed plugin, then cpu."""
    if has_tpu_chips():
        return None
    present = [name for name, devices in _GPU_DEVICES.items() if any(os.path.exists(d) for d in devices)]
    plugins = _installed_plugins() if present else set()
    return ",".join([*(name for name in present if any(name in p for p in plugins)), "cpu"])


def quiet_default() -> None:
    """Set JAX_PLATFORMS to `default_platforms()` unless the user set it or JAX is already imported (its config
    has read the environment)."""
    global _chosen
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    value = default_platforms()
    if value is not None:
        os.environ["JAX_PLATFORMS"] = _chosen = value


def choose(value: str) -> None:
    """A command's own platforms (compile-check and convert compute on the host CPU): replace tulu-jax's default,
    never a JAX_PLATFORMS the user set."""
    global _chosen
    if os.environ.get("JAX_PLATFORMS") in (None, _chosen):
        os.environ["JAX_PLATFORMS"] = _chosen = value
