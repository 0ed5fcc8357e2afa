"""How raw label values become classes: `label: {column: whi, positive: "yes"}` and friends."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LabelMap(BaseModel):
    """How raw label values become classes. Values are matched as trimmed, lower-cased text;
    a value that matches nothing is quarantined at ingest."""

    model_config = ConfigDict(extra="forbid")

    positive: list[str] | None = Field(None, description="binary: the value(s) meaning 1")
    negative: list[str] | None = Field(None, description="binary: the value(s) meaning 0")
    values: dict[str, int] | None = Field(None, description="explicit raw value -> class index")
    classes: list[str] | None = Field(None, description="multiclass: class names, in order")

    @model_validator(mode="before")
    @classmethod
    def _one_value_is_a_list(cls, data):
        if isinstance(data, dict):
            for key in ("positive", "negative", "classes"):
                if isinstance(data.get(key), str | int | bool):
                    data = {**data, key: [data[key]]}
        return data

    @model_validator(mode="after")
    def _normalized(self) -> LabelMap:
        def norm(value) -> str:
            return str(value).strip().lower()

        if self.values is not None:
            self.values = {norm(k): v for k, v in self.values.items()}
        for key in ("positive", "negative", "classes"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, [norm(v) for v in value])
        given = [k for k in ("positive", "values", "classes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of positive (+ negative), values or classes")
        if self.negative is not None and self.positive is None:
            raise ValueError("negative needs positive")
        return self

    def mapping(self) -> dict[str, int]:
        """Raw (normalized) value -> class index."""
        if self.values is not None:
            return dict(self.values)
        if self.classes is not None:
            return {name: index for index, name in enumerate(self.classes)}
        return {
            **dict.fromkeys(self.negative or [], 0),
            **dict.fromkeys(self.positive or [], 1),
        }
