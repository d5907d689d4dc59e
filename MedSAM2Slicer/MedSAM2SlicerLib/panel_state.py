"""Which of the panel's controls are usable in which state. One table, so the widget only applies it.

Encoding in the background never disables anything: a prompt or a propagation takes the worker from
it (it is cancelled between slices and resumed afterwards). A preview being computed leaves prompt
placement on (a new click is queued and previewed next). A propagation disables everything that
changes the session; Propagate turns into Cancel.
"""

from __future__ import annotations

import enum

# The panel's choices (labels shown -> what the logic takes).
# Window preset label -> engine intensity spec (medsam2.intensity.parse_intensity); None: the views' W/L.
WINDOW_PRESETS = {
    "Volume display": None,
    "Abdomen": "abdomen",
    "Soft tissue": "soft_tissue",
    "Liver": "liver",
    "Mediastinum": "mediastinum",
    "Lung": "lung",
    "Bone": "bone",
    "Brain": "brain",
    "MRI (percentile)": "mri",
    "Min-max": "minmax",
}
SLICE_AXES = {"Follow clicked view": None, "Axial": "axial", "Coronal": "coronal", "Sagittal": "sagittal"}
DIRECTIONS = {"Both directions": "both", "Forward (increasing slice)": "forward", "Backward": "backward"}


class Activity(str, enum.Enum):
    NO_INPUT = "no input"  # no source volume (or the engine cannot run)
    IDLE = "idle"
    ENCODING = "encoding"
    PREVIEWING = "previewing"
    PROPAGATING = "propagating"
    CANCELLING = "cancelling"


# Controls that change the session (or what it writes into) and so wait for a propagation to end.
SESSION_CONTROLS = (
    "inputVolumeSelector",
    "outputSegmentationSelector",
    "modelSelector",
    "deviceSelector",
    "engineLocationSelector",
    "windowPresetSelector",
    "rewindowButton",
    "sliceAxisSelector",
    "segmentSelector",
    "addSegmentButton",
    "clearPromptsButton",
    "undoButton",
    "redoButton",
    "exportDicomSegButton",
    "testConnectionButton",
    "installDependenciesButton",
    "applyTerminologyButton",
)
PROMPT_CONTROLS = ("positivePointButton", "negativePointButton", "boxButton")


def controlStates(activity: Activity, canUndo: bool = False, canRedo: bool = False) -> dict[str, bool]:
    """Enabled state per widget name of MedSAM2Slicer.ui."""
    hasInput = activity != Activity.NO_INPUT
    running = activity in (Activity.PROPAGATING, Activity.CANCELLING)
    states = {name: not running for name in SESSION_CONTROLS}
    states["inputVolumeSelector"] = not running
    for name in ("rewindowButton", "addSegmentButton", "clearPromptsButton", "exportDicomSegButton", "segmentSelector"):
        states[name] = hasInput and not running
    states["undoButton"] = canUndo and not running and activity != Activity.PREVIEWING
    states["redoButton"] = canRedo and not running and activity != Activity.PREVIEWING
    for name in PROMPT_CONTROLS:
        states[name] = hasInput and not running
    # Propagate while idle, encoding or previewing (queued after the preview); Cancel while running.
    states["applyButton"] = hasInput and activity != Activity.CANCELLING
    states["setFirstSliceButton"] = states["setLastSliceButton"] = hasInput and not running
    return states
