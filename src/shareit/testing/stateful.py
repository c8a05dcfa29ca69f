"""A Hypothesis state machine that drives a mapping and a plain ``dict`` side by side.

After every step the mapping must equal the dict: same contents, same length,
and, for backends that declare ``ordered``, the same iteration order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ..base import SharedMapping


def _strategies(mapping: SharedMapping,
                keys: Sequence[Hashable]) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    caps = mapping.capabilities
    key_st: st.SearchStrategy[Any]
    value_st: st.SearchStrategy[Any]
    if mapping.config.keys:
        key_st = st.sampled_from(list(mapping.config.keys))
    else:
        choices: list[Hashable] = list(keys)
        allowed = caps.key_types
        if allowed is None or int in allowed:
            choices += [1, 2, -7]
        if allowed is None or (tuple in allowed and int in allowed):
            choices += [("t", 1)]
        key_st = st.sampled_from(choices)
    vt = mapping.config.value_type
    if vt and vt.startswith(("int", "uint")):
        value_st = st.integers(0, 100)
    elif vt and vt.startswith("float"):
        value_st = st.integers(0, 100).map(float)
    elif vt == "bool":
        value_st = st.booleans()
    else:
        value_st = st.one_of(
            st.integers(-(2**40), 2**40),
            st.text(max_size=6),
            st.lists(st.integers(0, 9), max_size=3),
            st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
            st.none(),
        )
    return key_st, value_st


def mapping_state_machine(mapping: SharedMapping,
                          keys: Sequence[Hashable]) -> type[RuleBasedStateMachine]:
    """A state machine class over ``mapping`` (cleared at the start of every example)."""
    key_st, value_st = _strategies(mapping, keys)
    numeric = bool(mapping.config.value_type) and mapping.config.value_type != "bool"
    ordered = mapping.capabilities.ordered

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    class MappingVsDict(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            mapping.clear()
            self.model: dict[Hashable, Any] = {}

        def coerce(self, v: Any) -> Any:
            return mapping._coerce(v)

        @rule(k=key_st, v=value_st)
        def set(self, k: Any, v: Any) -> None:
            mapping[k] = v
            self.model[k] = self.coerce(v)

        @rule(k=key_st)
        def get(self, k: Any) -> None:
            assert mapping.get(k, "<absent>") == self.model.get(k, "<absent>")

        @rule(k=key_st)
        def delete(self, k: Any) -> None:
            if k in self.model:
                del mapping[k]
                del self.model[k]
            else:
                try:
                    del mapping[k]
                except KeyError:
                    pass
                else:
                    raise AssertionError(f"del of absent key {k!r} did not raise KeyError")

        @rule(k=key_st)
        def pop(self, k: Any) -> None:
            assert mapping.pop(k, "<absent>") == self.model.pop(k, "<absent>")

        @precondition(lambda self: bool(self.model))
        @rule()
        def popitem(self) -> None:
            k, v = mapping.popitem()
            if ordered:
                assert k == list(self.model)[-1]
            assert self.model.pop(k) == v

        @rule(items=st.dictionaries(key_st, value_st, max_size=4))
        def update(self, items: dict[Hashable, Any]) -> None:
            mapping.update(items)
            self.model.update({k: self.coerce(v) for k, v in items.items()})

        @rule()
        def clear(self) -> None:
            mapping.clear()
            self.model.clear()

        @rule(k=key_st, v=value_st)
        def setdefault(self, k: Any, v: Any) -> None:
            assert mapping.setdefault(k, v) == self.model.setdefault(k, self.coerce(v))

        @rule(k=key_st, delta=st.integers(-5, 5))
        def incr(self, k: Any, delta: int) -> None:
            current = self.model.get(k, 0)
            if not is_number(current):
                try:
                    mapping.incr(k, delta)
                except TypeError:
                    return
                raise AssertionError(f"incr of non-number {current!r} did not raise TypeError")
            if numeric and mapping.config.value_type.startswith("uint") and current + delta < 0:
                return
            assert mapping.incr(k, delta) == self.coerce(current + delta)
            self.model[k] = self.coerce(current + delta)

        @rule(k=key_st)
        def transform(self, k: Any) -> None:
            fn: Callable[[Any], Any] = (lambda v: v + 1) if numeric else (lambda v: [v])
            default = 0 if numeric else None
            expected = self.coerce(fn(self.model.get(k, default)))
            assert mapping.transform(k, fn, default=default) == expected
            self.model[k] = expected

        @precondition(lambda self: not numeric)
        @rule(k=key_st, v=value_st)
        def edit(self, k: Any, v: Any) -> None:
            with mapping.edit(k, default={"log": []}) as value:
                if isinstance(value, dict):
                    value["log"] = [v]
                else:
                    value = None  # rebinding does not write back: only in-place edits do
            current = self.model.get(k, {"log": []})
            if isinstance(current, dict):
                current = dict(current)
                current["log"] = [v]
            self.model[k] = current

        @invariant()
        def same_as_dict(self) -> None:
            snap = mapping.snapshot()
            assert snap == self.model, (snap, self.model)
            assert len(mapping) == len(self.model)
            if ordered:
                assert list(mapping) == list(self.model)

    return MappingVsDict
