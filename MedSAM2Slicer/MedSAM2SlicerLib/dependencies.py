"""First-use check and installation of what the engine needs, asking the user first.

Nothing here imports or installs anything at import time; the module calls :func:`plan_installation`
when the panel opens and :func:`ensure_dependencies` when the user agrees. torch is never installed
by pip here: the SlicerPyTorch extension picks the build that matches the machine's GPU driver, and
a pip-installed torch would be a multi-GB CPU or wrong-CUDA wheel. Everything else comes from
``Resources/requirements.txt`` through Slicer's pip helper.

Only the standard library is used (``packaging`` when present), so this runs in a bare Slicer.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"

# Installed by the PyTorch extension, not by pip (see module docstring).
TORCH_PACKAGES = frozenset({"torch", "torchvision"})

# sam2 compiles an optional CUDA extension at install time and imports torch to do so: it must be
# built against the torch already installed (no build isolation), and without nvcc the extension is
# skipped (sam2 then only warns that hole filling is unavailable).
PIP_FLAGS = ("--no-build-isolation",)
PIP_ENVIRONMENT = {"SAM2_BUILD_CUDA": "0"}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*$")


class DependencyError(RuntimeError):
    """Installation failed or was refused; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Requirement:
    name: str  # distribution name, as pip knows it
    specifier: str  # e.g. ">=1.1.0,<2" (may be empty)
    import_name: str  # module to look for, e.g. "PIL" for pillow

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}"


def read_requirements(path: Path | str = REQUIREMENTS_FILE) -> list[Requirement]:
    """Parse ``name<specifier>  # import: module`` lines; blank lines and comments are skipped."""
    requirements = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text, _, comment = raw.partition("#")
        if not text.strip():
            continue
        match = _NAME.match(text)
        if not match:
            raise DependencyError(f"{path}:{number}: cannot read requirement {raw.strip()!r}")
        name, specifier = match.group(1), match.group(2).replace(" ", "")
        import_name = name.replace("-", "_")
        hint = comment.strip()
        if hint.startswith("import:"):
            import_name = hint.split(":", 1)[1].strip()
        requirements.append(Requirement(name, specifier, import_name))
    return requirements


def _installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_present(import_name: str) -> bool:
    # find_spec does not execute the module: checking must not import torch into Slicer.
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def _satisfies(version: str, specifier: str) -> Optional[bool]:
    """True/False, or None when ``packaging`` is unavailable (presence is then all that is checked)."""
    if not specifier:
        return True
    try:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return None
    try:
        return Version(version) in SpecifierSet(specifier)
    except (InvalidSpecifier, InvalidVersion):
        return None


@dataclass
class InstallPlan:
    torch: list[Requirement] = field(default_factory=list)  # via the PyTorch extension
    pip: list[Requirement] = field(default_factory=list)  # via pip
    reasons: list[str] = field(default_factory=list)  # one line per unmet requirement

    @property
    def needed(self) -> bool:
        return bool(self.torch or self.pip)

    def pip_arguments(self) -> list[str]:
        """Arguments after ``pip install`` (a list, so specifiers such as ``<2`` need no shell quoting)."""
        return [*PIP_FLAGS, *(str(r) for r in self.pip)]

    def pip_command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "pip", "install", *self.pip_arguments()]

    def describe(self) -> str:
        lines = ["MedSAM2 needs Python packages that are not installed yet:"]
        lines += [f"  - {reason}" for reason in self.reasons]
        if self.torch:
            lines.append("PyTorch will be installed by the PyTorch extension (it picks the build for your GPU).")
        if self.pip:
            lines.append("Then: pip install " + " ".join(str(r) for r in self.pip))
        lines.append("This downloads several hundred MB and may take minutes. Install now?")
        return "\n".join(lines)


def plan_installation(
    requirements: Optional[Sequence[Requirement]] = None,
    module_present: Callable[[str], bool] = _module_present,
    installed_version: Callable[[str], Optional[str]] = _installed_version,
) -> InstallPlan:
    """What is missing or too old; the two callables are injectable so tests need no real packages."""
    plan = InstallPlan()
    for req in read_requirements() if requirements is None else requirements:
        version = installed_version(req.name)
        if not module_present(req.import_name) or version is None:
            reason = f"{req.name} is missing (needs {req.specifier or 'any version'})"
        elif _satisfies(version, req.specifier) is False:
            reason = f"{req.name} {version} is installed but {req.specifier} is needed"
        else:
            continue
        plan.reasons.append(reason)
        (plan.torch if req.name.lower() in TORCH_PACKAGES else plan.pip).append(req)
    return plan


def ensure_dependencies(
    confirm: Callable[[str], bool],
    install_torch: Callable[[list[Requirement]], bool],
    pip_install: Callable[[list[str]], object],
    requirements: Optional[Sequence[Requirement]] = None,
    plan_function: Callable[[Optional[Sequence[Requirement]]], InstallPlan] = plan_installation,
) -> bool:
    """Install what is missing after ``confirm(message)``; False when the user declines.

    ``install_torch`` is the PyTorch extension's installer, ``pip_install`` Slicer's
    ``slicer.util.pip_install`` (called with the argument list). Raises DependencyError when
    something is still missing afterwards.
    """
    plan = plan_function(requirements)
    if not plan.needed:
        return True
    if not confirm(plan.describe()):
        return False
    if plan.torch and not install_torch(plan.torch):
        raise DependencyError("PyTorch was not installed; install it in the PyTorch Utils module (PyTorch extension)")
    if plan.pip:
        for key, value in PIP_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        pip_install(plan.pip_arguments())
    importlib.invalidate_caches()
    remaining = plan_function(requirements)
    if remaining.needed:
        raise DependencyError("still missing after installation: " + "; ".join(remaining.reasons))
    return True


# A client-only install for a panel that uses an inference server: numpy and the remote client (in the
# medsam2 package shipped with the module), no torch, no sam2.
REMOTE_REQUIREMENTS_FILE = REQUIREMENTS_FILE.with_name("requirements-remote.txt")


def requirements_for(engine_location: str) -> list[Requirement]:
    """What the panel needs for "local" (the whole engine) or "remote" (the client only)."""
    return read_requirements(REMOTE_REQUIREMENTS_FILE if engine_location == "remote" else REQUIREMENTS_FILE)


def self_test_skip_reason(module_present: Callable[[str], bool] = _module_present) -> Optional[str]:
    """Why the module's self-test cannot run here (None when it can). It needs the in-process engine:
    Slicer's ctest runner calls the test method by name, so the method itself must ask this."""
    missing = [name for name in ("torch", "sam2") if not module_present(name)]
    if missing:
        return f"MedSAM2 self-test skipped: {' and '.join(missing)} not installed (install them from the module panel)"
    return None


def install_torch_with_pytorch_extension(requirements: Sequence[Requirement]) -> bool:
    """torch through Slicer's PyTorch extension (declared as this extension's dependency), which picks
    the build for the machine's GPU. Inside Slicer only."""
    try:
        import PyTorchUtils  # type: ignore[import-not-found]
    except ImportError:
        raise DependencyError(
            "the PyTorch extension is missing: install 'PyTorch' (Extensions Manager), restart Slicer"
        ) from None
    specs = {r.name: r.specifier or None for r in requirements}
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False,
        torchVersionRequirement=specs.get("torch"),
        torchvisionVersionRequirement=specs.get("torchvision"),
    )
    return torch is not None
