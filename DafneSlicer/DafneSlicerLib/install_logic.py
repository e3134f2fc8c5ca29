"""Python packages the module needs inside Slicer, installed on first use after the user agreed.

Torch comes through the PyTorch extension (``PyTorchUtils``), which picks the build matching the
GPU driver; the other packages through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or, on older
Slicer, a confirmed ``slicer.util.pip_install``. Slicer's own numpy, vtk, SimpleITK, pydicom and
requests are never installed or replaced. Nothing is installed at import time.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from dafne_logic.core.errors import DafneError

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.4"  # Linux Slicer can install at most torch 2.6 (see DESIGN.md §4)
# Slicer ships these; installing another version would break Slicer itself.
NEVER_INSTALL = ("numpy", "vtk", "SimpleITK", "pydicom", "requests", "torch")


class DependencyError(DafneError):
    """A package could not be installed (offline, declined, pip failure)."""


class SlicerPackaging(Protocol):
    """What install logic needs from Slicer (a fake in tests)."""

    def confirm(self, question: str) -> bool: ...
    def torch_installed(self) -> bool: ...
    def install_torch(self, version_requirement: str) -> bool: ...  # PyTorchUtils, without asking again
    def pip_install(self, requirements: list[Requirement], skip: tuple[str, ...]) -> None: ...


# (package, what it needs, its first version that needs more than Slicer may have): pip would
# otherwise pick the newest release and break the import, or replace a package Slicer ships.
# - MONAI 1.6 needs torch >= 2.8, which Linux Slicer cannot install (its torch wheels stop at 2.6).
# - highdicom 0.23 and later need pydicom >= 3.0.1; Slicer 5.10 ships pydicom 2.4.4 (Slicer issue
#   8796: pydicom 3 comes after 5.10), and highdicom 0.22 is the last release for pydicom 2 (it runs
#   with numpy 1 only: see unusable_here).
_HELD_BELOW = (("monai", "torch", "2.8", "1.6"), ("highdicom", "pydicom", "3.0.1", "0.23"))


def _older_than(version: str | None, bound: str) -> bool:
    try:
        return version is not None and Version(version) < Version(bound)
    except InvalidVersion:
        return False


def _installed(version_of: Callable[[str], str], name: str) -> str | None:
    try:
        return version_of(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unusable_here(requirement: Requirement, version_of: Callable[[str], str] = importlib.metadata.version) -> bool:
    """Whether no release of ``requirement`` can run beside the packages Slicer ships; it is then not
    installed, and the feature that needs it says why when used (DICOM SEG: ``dicom_seg._highdicom``).

    highdicom: 0.23 and later need pydicom 3, and 0.22 (the last for pydicom 2) uses ``numpy.float_``,
    which numpy 2 removed; Slicer 5.10 has pydicom 2.4.4, and numpy 2 (Python 3.12).
    """
    if requirement.name.lower() != "highdicom":
        return False
    numpy = _installed(version_of, "numpy")
    return _older_than(_installed(version_of, "pydicom"), "3.0.1") and numpy is not None and not _older_than(numpy, "2")


def fit_to_installed(requirement: Requirement, version_of: Callable[[str], str] = importlib.metadata.version) -> Requirement:
    """``requirement``, held below the versions that need a newer torch or pydicom than the installed one.

    ``version_of`` gives an installed distribution's version (raising ``PackageNotFoundError`` when absent).
    """
    for package, needs, needed_version, first_too_new in _HELD_BELOW:
        if requirement.name.lower() == package and _older_than(_installed(version_of, needs), needed_version):
            held = Requirement(str(requirement))  # a copy: extras and markers stay
            held.specifier &= SpecifierSet(f"<{first_too_new}")
            return held
    return requirement


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[Requirement]:
    """Requirements of ``Resources/requirements.txt`` (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Requirement(line) for line in lines if line]


def is_satisfied(requirement: Requirement, version_of: Callable[[str], str] = importlib.metadata.version) -> bool:
    """Whether an installed distribution satisfies ``requirement`` (no import, no subprocess).

    A requirement whose environment marker does not apply here (another OS) counts as satisfied.
    """
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    installed = _installed(version_of, requirement.name)
    return installed is not None and requirement.specifier.contains(installed, prereleases=True)


@dataclass
class InstallLogic:
    """Checks and, with the user's consent, installs what segmentation and fine-tuning need."""

    packaging: SlicerPackaging
    requirements: list[Requirement]
    version_of: Callable[[str], str] = importlib.metadata.version

    def missing(self) -> list[str]:
        """Human-readable list of what is missing ("torch>=2.4", "monai>=1.5", ...)."""
        missing = [] if self.packaging.torch_installed() else [f"torch{TORCH_REQUIREMENT}"]
        return missing + [str(r) for r in self._missing_requirements()]

    def _missing_requirements(self) -> list[Requirement]:
        """Requirements not yet satisfied, less those that cannot run beside Slicer's own packages."""
        return [r for r in self.requirements
                if not is_satisfied(r, self.version_of) and not unusable_here(r, self.version_of)]

    def ensure(self) -> bool:
        """Make every dependency importable; False if the user declined (nothing changed).

        Raises:
            DependencyError: installation failed, e.g. offline; clicking again retries.
        """
        missing = self.missing()
        if not missing:
            return True
        question = ("DafneSlicer needs these Python packages, which are not installed yet:\n\n  "
                    + "\n  ".join(missing)
                    + "\n\nDownload and install them now (several hundred MB for torch)? Slicer's own numpy, "
                      "vtk, SimpleITK, pydicom and requests are left untouched.")
        if not self.packaging.confirm(question):
            return False
        try:
            if not self.packaging.torch_installed() and not self.packaging.install_torch(TORCH_REQUIREMENT):
                raise DependencyError("PyTorch was not installed; install the PyTorch extension and try again.")
            pip_missing = [fit_to_installed(r, self.version_of) for r in self._missing_requirements()]
            if pip_missing:
                self.packaging.pip_install(pip_missing, NEVER_INSTALL)
        except DependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - pip and network failures come in many types
            raise DependencyError(
                f"Installing {', '.join(missing)} failed ({(str(exc).splitlines() or [type(exc).__name__])[0]}). "
                "Check the internet connection (or proxy) and click again to retry.") from exc
        still = self.missing()
        if still:
            raise DependencyError(f"Still missing after installation: {', '.join(still)}. Restart Slicer and retry.")
        return True
