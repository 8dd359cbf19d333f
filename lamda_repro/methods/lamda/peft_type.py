"""Adds LAMDA to peft's PeftType enum so that peft can save, find and load LaMDA adapters.

peft 0.21 only registers methods whose name is a PeftType member; the enum is closed, so the
member is added at import time, the same way the enum machinery adds its own members.
"""

from __future__ import annotations

from peft.utils import PeftType

LAMDA_NAME = "LAMDA"


def _add_enum_member(enum_cls, name: str):
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


LAMDA_PEFT_TYPE = _add_enum_member(PeftType, LAMDA_NAME)
