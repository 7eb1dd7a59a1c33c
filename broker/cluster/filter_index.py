"""Which MQTT filters match a topic, in time proportional to the topic's depth.

The cluster asks this for every QoS 1 publish ("does a persistent subscription anywhere
need this stored?"), and a fleet holds one filter per device, so a scan over every filter
(``topic_matches`` in a loop) would cost thousands of comparisons per message. The index is
a trie over topic levels with ``+`` and ``#`` branches, counting how many owners hold each
filter so that two sessions on one filter are added and removed independently.

Matching follows MQTT 3.1.1 section 4.7: ``#`` also matches its parent level, and a
filter starting with a wildcard never matches a topic starting with ``$``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetcore.topics import has_wildcard

__all__ = ["FilterIndex"]


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    #: How many owners hold the filter ending at this node.
    here: int = 0
    #: How many owners hold ``<this node>/#``.
    hash: int = 0

    def empty(self) -> bool:
        return not self.children and self.here == 0 and self.hash == 0


class FilterIndex:
    """A multiset of MQTT topic filters, asked whether any of them matches a topic."""

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, topic_filter: str) -> None:
        """Count one more owner of ``topic_filter`` (a malformed filter, which matches
        nothing, is ignored)."""
        levels = _levels(topic_filter)
        if levels is None:
            return
        node = self._root
        if levels[-1] == "#":
            for level in levels[:-1]:
                node = node.children.setdefault(level, _Node())
            node.hash += 1
        else:
            for level in levels:
                node = node.children.setdefault(level, _Node())
            node.here += 1
        self._size += 1

    def remove(self, topic_filter: str) -> None:
        """Count one owner fewer of ``topic_filter`` (a filter never added is ignored)."""
        levels = _levels(topic_filter)
        if levels is None:
            return
        hashed = levels[-1] == "#"
        path = levels[:-1] if hashed else levels
        trail: list[tuple[_Node, str]] = []
        node = self._root
        for level in path:
            child = node.children.get(level)
            if child is None:
                return
            trail.append((node, level))
            node = child
        if hashed:
            if node.hash == 0:
                return
            node.hash -= 1
        else:
            if node.here == 0:
                return
            node.here -= 1
        self._size -= 1
        for parent, level in reversed(trail):
            if not parent.children[level].empty():
                break
            del parent.children[level]

    def matches(self, topic: str) -> bool:
        """True when at least one filter in the index matches ``topic``."""
        if self._size == 0:
            return False
        levels = topic.split("/")
        return _match(self._root, levels, 0, dollar=topic.startswith("$"))


def _levels(topic_filter: str) -> list[str] | None:
    """The filter's levels, or None when a wildcard is misplaced (``a#``, ``#/a``)."""
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if level == "#" and index != len(levels) - 1:
            return None
        if level not in ("+", "#") and has_wildcard(level):
            return None
    return levels


def _match(node: _Node, levels: list[str], depth: int, *, dollar: bool) -> bool:
    wild_ok = not (dollar and depth == 0)
    if node.hash and wild_ok:
        return True  # "x/#" matches "x" itself and everything under it
    if depth == len(levels):
        return node.here > 0
    child = node.children.get(levels[depth])
    if child is not None and _match(child, levels, depth + 1, dollar=dollar):
        return True
    if wild_ok:
        plus = node.children.get("+")
        if plus is not None and _match(plus, levels, depth + 1, dollar=dollar):
            return True
    return False
