"""The module's parameter node: what is saved with the scene and bound to widgets by name.

Widgets carry a ``SlicerParameterName`` property in the .ui file (``inputVolume``, ``device``, ``singleLegSide``),
so ``connectGui`` keeps them and the node in sync both ways.
"""

from __future__ import annotations

from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

from .segmentation_logic import DEVICES, SINGLE_LEG_SIDES


@parameterNodeWrapper
class DafneSlicerParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    modelName: str = "thigh"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    singleLegSide: Annotated[str, Choice(list(SINGLE_LEG_SIDES))] = "auto"
