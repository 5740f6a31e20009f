"""Whether an observed object still carries what gpuaas applied (drift detection)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_FACTORS: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(quantity: object) -> Decimal | None:
    """A Kubernetes quantity as a number; None when it is not one. The API server rewrites
    quantities canonically ("2048Gi" comes back as "2Ti"), so they are compared by value."""
    match = _QUANTITY.match(str(quantity))
    if match is None:
        return None
    return Decimal(match.group(1)) * _FACTORS[match.group(2) or ""]


def _same_value(desired: Any, observed: Any) -> bool:
    if isinstance(desired, Mapping):
        return isinstance(observed, Mapping) and all(_same_value(v, observed.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(desired) == len(observed)
            and all(_same_value(d, o) for d, o in zip(desired, observed, strict=True))
        )
    if desired == observed:
        return True
    if isinstance(desired, str) and isinstance(observed, str):
        wanted, seen = parse_quantity(desired), parse_quantity(observed)
        return wanted is not None and wanted == seen
    return False


def has_drifted(desired: Mapping[str, Any], observed: Mapping[str, Any] | None) -> bool:
    """True when the object is missing, or any field gpuaas sets differs. Extra labels, annotations
    and fields that others add are not drift; gpuaas only owns what it applies."""
    if observed is None:
        return True
    return any(not _same_value(value, observed.get(key)) for key, value in desired.items() if key != "status")
