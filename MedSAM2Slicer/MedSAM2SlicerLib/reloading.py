"""Developer "Reload": Slicer's reloadScriptedModule re-imports only the module file, so the Lib
package is reloaded here first, leaves before the modules that import them."""

from __future__ import annotations

import importlib
import sys

# Dependency order: every module comes after the ones it imports.
ORDER = (
    "versions",
    "dependencies",
    "errors",
    "worker",
    "engine_client",
    "geometry",
    "terminology",
    "segments",
    "prompts",
    "writer",
    "sessions",
    "runs",
    "panel_state",
    "licences",
    "remote_settings",
    "dicom_export",
    "settings_store",
    "logic",
)


def reloadLib(package: str = "MedSAM2SlicerLib") -> list[str]:
    """Reload the package's loaded modules; returns their names in the order reloaded."""
    reloaded = []
    for name in ORDER:
        module = sys.modules.get(f"{package}.{name}")
        if module is not None:
            importlib.reload(module)
            reloaded.append(module.__name__)
    if package in sys.modules:
        importlib.reload(sys.modules[package])
    return reloaded
