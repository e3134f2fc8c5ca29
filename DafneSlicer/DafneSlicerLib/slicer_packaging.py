"""The :class:`~DafneSlicerLib.install_logic.SlicerPackaging` of a running Slicer."""

from __future__ import annotations

import importlib.util

import slicer
from packaging.requirements import Requirement

from .install_logic import DependencyError


class SlicerPackaging:
    def confirm(self, question: str) -> bool:
        return bool(slicer.util.confirmOkCancelDisplay(question, "DafneSlicer: install Python packages"))

    def torch_installed(self) -> bool:
        return importlib.util.find_spec("torch") is not None

    def install_torch(self, version_requirement: str) -> bool:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise DependencyError("The PyTorch extension is missing: install 'PyTorch' from the Extensions Manager, "
                                  "restart Slicer and try again.") from exc
        # The user agreed to the whole list (torch included) in InstallLogic.ensure: one question, not two.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=version_requirement)
        return torch is not None

    def pip_install(self, requirements: list[Requirement], skip: tuple[str, ...]) -> None:
        try:
            from slicer.packaging import pip_ensure  # Slicer >= 5.12: walks dependencies, skips Slicer's own
        except ImportError:
            pip_ensure = None
        if pip_ensure is not None:
            pip_ensure(requirements, skip_packages=list(skip), prompt_install=False, requester="DafneSlicer")
            return
        # Older Slicer: no dependency walking, so install without dependencies; the packages listed in
        # requirements.txt need nothing beyond numpy, torch and each other, which are present or listed.
        slicer.util.pip_install(["--no-deps", *[str(r) for r in requirements]])
