"""Hounsfield-unit thresholds shared by the mask content check (masks.py) and its description
(checks.py); plain constants, so the definitions load them without numpy."""

# Above this, a voxel has the density of cortical bone (or of positive oral contrast).
BONE_HU = 300
# Below this, a voxel is gas; gas connected, within its slice, to the edge of the image is outside the body.
AIR_HU = -500
