"""``given``: the source's own conditioning images (a hub dataset's column, a folder of pairs).
What they are (categorical, binary, continuous) is read from the training conditions, or stated
in ``conditions.map_type``; the learned extractor scores them."""

from __future__ import annotations

from .condition import Condition, ConditionError, Made
from .maps import MapType, discover


class Given(Condition):
    name = "given"
    photo_hint = "nothing: this recipe's conditions come from its data"

    def make(self, image, row: dict) -> Made:
        given = row.get("source_condition")
        if given is None:
            return Made(None, row.get("problem") or "no_conditioning_image", row.get("landmarks"))
        return Made(given, None, row.get("landmarks"))

    def from_photo(self, photo, name: str = "the photo"):
        raise ConditionError(
            "this recipe's conditions come from its data source (conditions.kind: given); pass a condition image"
        )

    def report(self) -> dict:
        return {"kind": self.name, "map_type": self.c.map_type}

    def map_type(self, conditions: list, resolution: int) -> MapType:
        found = discover(conditions, resolution)
        if self.c.map_type in ("auto", found.kind):
            return found
        stated = self.c.map_type
        if stated == "continuous":
            return MapType("continuous", why=f"continuous: stated in conditions.map_type (the data looked {found.why})")
        # categorical or binary, stated: the data's own colours are the palette
        palette = found.palette[:2] if stated == "binary" else found.palette
        if len(palette) < 2:
            raise ConditionError(f"conditions.map_type: {stated}: the training conditions have no palette ({found.why})")
        names = ("background", "line") if stated == "binary" else tuple(f"class {i}" for i in range(len(palette)))
        ignore = found.ignore if stated == "categorical" else None
        return MapType(stated, palette, names, ignore, why=f"{stated}: stated in conditions.map_type ({found.why})")
