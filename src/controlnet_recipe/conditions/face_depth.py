"""``face_depth``: a depth-like shading of each face, drawn exactly from its landmarks (the head a
dome, the nose raised, eyes and mouth set back; the background black). A continuous condition
the synthetic faces render exactly: the embedded ``depth`` recipe trains on it. Its fidelity is
the learned extractor's SSIM (RMSE beside it); no face metric applies."""

from __future__ import annotations

from ..faces.draw import draw_depth
from .landmarks import LandmarkDrawn
from .maps import MapType


class FaceDepth(LandmarkDrawn):
    name = "face_depth"
    photo_hint = "a depth-like shading drawn from its landmarks"
    draw = staticmethod(draw_depth)

    def map_type(self, conditions: list, resolution: int) -> MapType:
        return MapType("continuous", why="continuous: a depth-like shading, grey levels from the landmarks")
