"""Shared API pieces: the model base with camelCase aliases, and status conditions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "gpuaas.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

ConditionStatus = Literal["True", "False", "Unknown"]


class ApiModel(BaseModel):
    """Base of every CRD model: camelCase on the wire, snake_case in Python."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, object]:
        """The JSON form Kubernetes stores, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(ApiModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    status: ConditionStatus
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: datetime
    observed_generation: int | None = None


def set_condition(existing: list[Condition], new: Condition) -> list[Condition]:
    """Return conditions with `new` merged in; lastTransitionTime only moves when the status changes."""
    merged: list[Condition] = []
    replaced = False
    for condition in existing:
        if condition.type != new.type:
            merged.append(condition)
            continue
        replaced = True
        if condition.status == new.status:
            merged.append(new.model_copy(update={"last_transition_time": condition.last_transition_time}))
        else:
            merged.append(new)
    if not replaced:
        merged.append(new)
    return merged
